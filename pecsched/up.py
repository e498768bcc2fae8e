"""`pecsched up`: a whole cluster on this machine, in the foreground, with a live status line.

Runs `pecsched db upgrade`, starts the control plane and one agent (N workers: N-1 general and
one short-decode) as child processes, waits until every instance is registered, and then shows a
status line (queues by class, busy instances, throughput, counters) until Ctrl-C, which stops
the children cleanly (SIGTERM, then SIGKILL after a grace period).

`--demo` first replays the same slice of the Azure traces under `fifo` and under `--policy`
and compares them (pecsched/demo.py), then keeps serving. `--demo-only` exits after that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pecsched.demo import DEMO_DURATION_S, run_demo

if TYPE_CHECKING:
    from pecsched.cluster import ClusterSpec, LocalCluster
    from sdk.types import ClusterSnapshot

AGENT_DRAIN_ARGS = ("--drain-timeout", "5")
CUDA_DEFAULT_MODEL = "llama-3.2-1b"
CUDA_KV_BUDGET = "8GiB"  # per worker: N workers may share one GPU, so never "all free memory"
# `tiny` on CPU: KV for the preset's 16,384 positions per worker (512 B a token: 8 MiB), so a
# long prompt of the demo fits one worker.
TINY_CPU_KV_BUDGET = "16384"
CUDA_DEFAULT_WORKERS = 4
MAX_CPU_GENERAL_WORKERS = 3
# Scheduler settings for `tiny` on CPU (4,096-token KV per worker): prompts of 1,024+ tokens are
# long, prefills run in 256-token chunks so a long one can be paused many times.
CPU_CONFIG_TOML = """\
auth_enabled = false

[scheduler]
short_threshold_tokens = 1024
chunk_tokens = 256
"""
GPU_CONFIG_TOML = "auth_enabled = false\n"  # the paper's thresholds (4,096 / 8,192-token chunks)
# Workers sharing a GPU never form an SP group: NCCL cannot put two ranks of one group on one
# GPU (the agent refuses such groups too), so the policy plans with SP degree 1 there.
SHARED_GPU_SCHEDULER_TOML = "\n[scheduler]\nmax_sp_degree = 1\n"


def config_toml(device: str, num_workers: int, num_gpus: int) -> str:
    """The control plane's config for a local cluster of `num_workers` on `device`."""
    if device == "cpu":
        return CPU_CONFIG_TOML
    if num_workers > num_gpus:  # the agent puts worker i on GPU i mod num_gpus
        return GPU_CONFIG_TOML + SHARED_GPU_SCHEDULER_TOML
    return GPU_CONFIG_TOML


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device: str) -> int:
    """Workers `up` starts without --workers: on CPU one general worker per usable core (at
    most MAX_CPU_GENERAL_WORKERS) plus the short-decode worker, since CPU workers that share a
    core add no compute; CUDA_DEFAULT_WORKERS on cuda."""
    if device == "cuda":
        return CUDA_DEFAULT_WORKERS
    return min(usable_cores(), MAX_CPU_GENERAL_WORKERS) + 1


def register(subparsers: Any) -> None:
    """Add `up` to the `pecsched` command."""
    p = subparsers.add_parser(
        "up",
        help="run a local cluster (control plane + agent) in the foreground",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    _add_cluster_args(p)
    _add_service_args(p)
    _add_runtime_args(p)
    _add_demo_args(p)
    p.set_defaults(handler=_handle)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    """What runs: how many workers, on which device, with which model."""
    p.add_argument(
        "--workers",
        type=int,
        help=f"worker processes (default: on cpu one general worker per core, at most "
        f"{MAX_CPU_GENERAL_WORKERS}, plus the short-decode worker, here "
        f"{default_workers('cpu')}; {CUDA_DEFAULT_WORKERS} on cuda); on cuda worker i uses GPU "
        "i mod #GPUs, so N workers may share one GPU, each with --kv-budget of KV (the agent "
        "refuses shares that do not fit)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--model",
        help=f"preset or HF directory (default: tiny on cpu, {CUDA_DEFAULT_MODEL} on cuda)",
    )


def _add_service_args(p: argparse.ArgumentParser) -> None:
    """The control plane: its database, ports and scheduling policy."""
    p.add_argument("--db", default="sqlite:///pecsched.db", help="database URL")
    p.add_argument("--port", type=int, default=50051, help="control plane port on 127.0.0.1")
    p.add_argument("--policy", default="pecsched", help="scheduling policy")
    p.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP API on 127.0.0.1:PORT (default 8000; 0 disables)",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The workers' KV budget, where spans go and where the children log."""
    p.add_argument(
        "--kv-budget",
        help=f"KV pool per worker (default: {TINY_CPU_KV_BUDGET} tokens for tiny on cpu, else "
        f"the agent's on cpu; {CUDA_KV_BUDGET} on cuda, where the workers share one GPU)",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="OTLP/gRPC collector (e.g. http://127.0.0.1:4317) for the spans of the control plane, "
        "the agent and its workers (default: OTEL_EXPORTER_OTLP_ENDPOINT, else none)",
    )
    p.add_argument(
        "--log-dir", default="pecsched-logs", help="children's logs (default ./pecsched-logs)"
    )


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    """The demo: a fifo-vs-policy comparison on a trace slice before serving."""
    p.add_argument(
        "--demo", action="store_true", help="first compare fifo and --policy on a trace slice"
    )
    p.add_argument("--demo-only", action="store_true", help="exit after the demo's comparison")
    p.add_argument(
        "--demo-duration",
        type=float,
        default=DEMO_DURATION_S,
        metavar="S",
        help=f"seconds of (compressed) arrivals per policy (default {DEMO_DURATION_S:.0f})",
    )
    p.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        help="demo trace CSV (default: both Azure files)",
    )


def cluster_spec(args: argparse.Namespace, num_gpus: int = 0) -> ClusterSpec:
    """The ClusterSpec `up` starts for its flags (`num_gpus`: GPUs visible, for cuda)."""
    from pecsched.cluster import AgentSpec, ClusterSpec

    if args.workers is None:
        args.workers = default_workers(args.device)
    if args.workers < 2:
        raise ValueError(f"--workers must be >= 2 (one is short-decode), got {args.workers}")
    model = args.model or ("tiny" if args.device == "cpu" else CUDA_DEFAULT_MODEL)
    roles = ("general",) * (args.workers - 1) + ("short_decode",)
    kv_budget = args.kv_budget
    if kv_budget is None and args.device == "cuda":
        kv_budget = CUDA_KV_BUDGET
    elif kv_budget is None and model == "tiny":
        kv_budget = TINY_CPU_KV_BUDGET
    has_tokenizer = (Path(model) / "tokenizer.json").is_file()
    return ClusterSpec(
        db_url=args.db,
        port=args.port,
        policy=args.policy,
        # A model directory's own tokenizer serves text and chat prompts (else: UTF-8 bytes).
        tokenizer_dir=model if has_tokenizer else None,
        http_port=args.http_port or None,
        model_name=Path(model).name,
        otlp_endpoint=args.otlp_endpoint,
        config_toml=config_toml(args.device, args.workers, num_gpus),
        # A short drain: Ctrl-C should not wait a minute for work that is being thrown away.
        agents=(
            AgentSpec("local", roles, model, args.device, kv_budget, extra_args=AGENT_DRAIN_ARGS),
        ),
    )


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (a KeyboardInterrupt, so asyncio and threads let it through)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _handle(args: argparse.Namespace) -> int:
    from pecsched.cluster import ClusterError, LocalCluster

    num_gpus = 0
    if args.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
    try:
        spec = cluster_spec(args, num_gpus)
    except ValueError as exc:
        print(f"pecsched up: error: {exc}", file=sys.stderr)
        return 2
    cluster = LocalCluster(spec, Path(args.log_dir))
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        print(
            f"starting: control plane on {spec.target} ({spec.db_url}, policy {spec.policy}), "
            f"agent with {args.workers} {spec.agents[0].model} workers on {args.device} "
            f"(logs in {args.log_dir}/)",
            flush=True,
        )
        cluster.start(ready_timeout_s=180.0)
        print(f"ready: {spec.num_instances} instances registered", flush=True)
        if args.demo or args.demo_only:
            code = run_demo(
                args,
                cluster,
                lambda: _StatusThread(spec.target, cluster),
                num_gpus if args.device == "cuda" else usable_cores(),
            )
            if args.demo_only:
                return code
        _print_usage(spec)
        _serve(cluster, spec.target)
    except _Stop:
        print("\nstopping...", file=sys.stderr, flush=True)
    except ClusterError as exc:
        print(f"pecsched up: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        codes = cluster.stop()
        print(f"stopped ({', '.join(f'{k}: {v}' for k, v in codes.items())})", file=sys.stderr)
    return code


def _print_usage(spec: ClusterSpec) -> None:
    script = Path(sys.executable).parent / "pecsched"
    cli = str(script) if script.exists() else f"{sys.executable} -m pecsched"
    db_file = spec.db_url.removeprefix("sqlite:///") if spec.db_url.startswith("sqlite:///") else ""
    lines = [
        f"serving on {spec.target}; Ctrl-C stops the cluster. From another terminal:",
        f'  {cli} submit "hello" --max-tokens 16 --target {spec.target}',
        f"  {cli} list --target {spec.target}",
        f"  {cli} top --target {spec.target}",
    ]
    if spec.http_port is not None:
        lines.append(
            f"  OpenAI API: http://127.0.0.1:{spec.http_port}/v1 (model {spec.model_name})"
        )
    if db_file:
        query = "select * from request_history limit 10"
        if shutil.which("sqlite3"):
            lines.append(f"  sqlite3 {db_file} '{query}'")
        else:
            lines.append(
                f'  {sys.executable} -c "import sqlite3; '
                f"[print(r) for r in sqlite3.connect('{db_file}').execute('{query}')]\""
            )
    print("\n".join(lines), flush=True)


def status_line(snapshot: ClusterSnapshot) -> str:
    """One line: queues by class, busy instances, throughput and the cluster's counters."""
    by_class = {c.request_class.value: c for c in snapshot.classes}
    parts = []
    for name in ("short", "long"):
        c = by_class.get(name)
        if c is not None:
            parts.append(
                f"{name}: {c.num_queued} queued {c.num_prefilling + c.num_paused} prefill "
                f"{c.num_decoding} decode {c.num_finished_total} done"
            )
    busy = sum(1 for i in snapshot.instances if i.request_ids)
    parts.append(f"busy {busy}/{len(snapshot.instances)}")
    parts.append(f"{snapshot.throughput_rps:.2f} req/s")
    parts.append(
        f"preempt {snapshot.num_preemptions_total} coloc {snapshot.num_colocations_total} "
        f"kv {snapshot.num_kv_transfers_total}"
    )
    return " | ".join(parts)


def _stderr_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return shutil.get_terminal_size().columns


class _StatusThread(threading.Thread):
    """Prints the status line: in place on a terminal, else one line every 10 seconds."""

    def __init__(self, target: str, cluster: LocalCluster) -> None:
        super().__init__(daemon=True, name="status")
        self._target = target
        self._cluster = cluster
        self._done = threading.Event()

    def run(self) -> None:
        from sdk.client import Client
        from sdk.errors import PecSchedError

        tty = sys.stderr.isatty()
        last_print = 0.0
        with Client(self._target) as client:
            while not self._done.is_set():
                try:
                    for snapshot in client.watch(interval_s=1.0):
                        if self._done.is_set():
                            break
                        now = time.monotonic()
                        if tty:
                            # Clipped to the width: a wrapped line would scroll on each redraw.
                            line = status_line(snapshot)[: _stderr_columns() - 1]
                            sys.stderr.write("\r\x1b[K" + line)
                            sys.stderr.flush()
                        elif now - last_print >= 10.0:
                            print(status_line(snapshot), file=sys.stderr, flush=True)
                            last_print = now
                except PecSchedError:
                    self._done.wait(1.0)
        if tty:
            sys.stderr.write("\n")

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=3.0)


def _serve(cluster: LocalCluster, target: str) -> None:
    # The status line runs until a signal raises _Stop here, or a child dies.
    status = _StatusThread(target, cluster)
    status.start()
    try:
        while True:
            cluster.check_alive()
            time.sleep(0.5)
    finally:
        status.stop()
