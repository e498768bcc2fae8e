"""Live cluster vs simulator: one trace slice, several policies, real requests and `pecsched sim`.

    .venv/bin/python bench/live_vs_sim.py --device cuda --model llama-3.1-8b --workers 2 \\
        --policies fifo,priority,pecsched --duration 90 --time-scale 1.5 \\
        --long-rescale 8000:32000 --max-output-tokens 256 --kv-budget 40GiB \\
        --gpu h100 --sim-model llama-3-8b \\
        --calibration bench/results/calibration_h100_llama-3-8b.json --out out/live

For each policy: a fresh local cluster (control plane on SQLite, one agent with N workers, the
last K of them short-decode, the rest general; on CUDA worker i runs on GPU i mod #GPUs),
`pecsched replay` of the slice (its JSON, and the requests it sent as an Azure CSV), then the
cluster stops. With `--gpu`, `pecsched sim` then runs the requests as sent on N simulated GPUs of the
same model (tp 1, K short-decode instances as live), its cost model fitted to `--calibration`
(the engine's measured profile).
Prints live vs simulated: short queueing delay p50/p99, short throughput, long mean JCT, and
writes everything under `--out`. The scheduler settings are the control plane's defaults on
CUDA (those the simulator uses); on CPU they are `pecsched up`'s for the `tiny` model, which the
simulator does not model, so compare CPU runs only with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sim.workloads import AZURE_TRACES  # noqa: E402


def run_live(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """One policy on a fresh cluster; returns the replay's JSON document (also written)."""
    from pecsched.cluster import AgentSpec, ClusterSpec, LocalCluster, free_port
    from pecsched.replay import replay_options, run_replay
    from pecsched.up import config_toml
    from sim.workloads import write_azure_csv

    out = args.out / policy
    out.mkdir(parents=True, exist_ok=True)
    (out / "pecsched.db").unlink(missing_ok=True)
    k = args.short_decode_workers
    roles = ("general",) * (args.workers - k) + ("short_decode",) * k
    spec = ClusterSpec(
        db_url=f"sqlite:///{out / 'pecsched.db'}",
        port=free_port(),
        policy=policy,
        config_toml=args.config.read_text()
        if args.config
        else config_toml(args.device, args.workers, _num_gpus(args.device)),
        agents=(AgentSpec("node0", roles, args.model, args.device, args.kv_budget),),
    )
    cluster = LocalCluster(spec, out / "logs")
    replay = replay_options(
        time_scale=args.time_scale,
        token_scale=args.token_scale,
        long_threshold_tokens=args.long_threshold_tokens,
        long_rescale=args.long_rescale,
        max_output_tokens=args.max_output_tokens,
        duration=args.duration,
        drain_timeout=args.drain_timeout,
    )
    try:
        cluster.start(ready_timeout_s=args.ready_timeout)
        report = asyncio.run(run_replay(args.trace, replay, spec.target, None))
    finally:
        cluster.stop()
    print(report.table, flush=True)
    write_azure_csv(report.workload, out / "workload.csv")
    (out / "live.json").write_text(json.dumps(report.payload, indent=2) + "\n")
    return report.payload


def _num_gpus(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def run_sim(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """`pecsched sim` on the requests the live run sent; returns its JSON document."""
    out = args.out / policy
    command = [
        sys.executable, "-m", "pecsched", "sim",
        "--trace", str(out / "workload.csv"), "--long-rescale", "none",
        "--gpus", str(args.workers), "--gpu", args.gpu, "--model", args.sim_model or args.model,
        "--tp", "1",
        "--policy", policy, "--jobs", "1", "--json", str(out / "sim.json"),
        "--short-decode-instances", str(args.short_decode_workers),  # the live roles
    ]  # fmt: skip
    if args.calibration:
        command += ["--calibration", args.calibration]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    result: dict[str, Any] = json.loads((out / "sim.json").read_text())
    return result


def _row(policy: str, source: str, payload: dict[str, Any]) -> str:
    result = payload["results"][0]
    short, long = result["short"], result["long"]
    qd = short["queueing_delay_s"]

    def f(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value * scale:.{digits}f}"

    return (
        f"| {policy} | {source} | {short['count']} | {f(qd['p50'], 1e3)} | {f(qd['p99'], 1e3)} | "
        f"{f(short['throughput_rps'], digits=2)} | {long['count']} | {f(long['jct_mean_s'])} | "
        f"{result['preemptions_total']} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="tiny", help="preset name")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (GPUs)")
    parser.add_argument(
        "--short-decode-workers",
        type=int,
        default=1,
        help="of them, short-decode (the rest general)",
    )
    parser.add_argument("--kv-budget", help="KV pool per worker (TOKENS or a size)")
    parser.add_argument("--policies", default="fifo,priority,pecsched")
    parser.add_argument(
        "--config", type=Path, help="control plane config TOML (default: `pecsched up`'s)"
    )
    parser.add_argument("--trace", action="append", help="trace CSV (default: both Azure files)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of trace")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--token-scale", type=float, default=1.0)
    parser.add_argument("--long-threshold-tokens", type=int, default=4096)
    parser.add_argument("--long-rescale", default="8000:32000", metavar="LOW:HIGH")
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--gpu", help="simulate on this GPU type (h100, a100); omit: no sim")
    parser.add_argument("--calibration", help="calibration JSON for the simulator")
    parser.add_argument("--sim-model", help="the simulator's name of the model (default: --model)")
    parser.add_argument("--out", type=Path, default=Path("out/live_vs_sim"))
    args = parser.parse_args()
    args.trace = args.trace or [str(p) for p in AZURE_TRACES]
    if not 1 <= args.short_decode_workers < args.workers:
        parser.error("--short-decode-workers must be >= 1 and leave >= 1 general worker")

    rows = []
    for policy in args.policies.split(","):
        rows.append(_row(policy, "live", run_live(policy, args)))
        if args.gpu:
            rows.append(_row(policy, "sim", run_sim(policy, args)))
    print(
        f"\n{args.model} on {args.workers} {args.device} workers, {args.duration:.0f} s of trace "
        f"(time x{args.time_scale}, longs {args.long_rescale} tokens)"
    )
    print(
        "| policy | source | shorts | short qd p50 ms | short qd p99 ms | short req/s | longs | "
        "long mean JCT s | preemptions |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    (args.out / "table.md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
