"""`pecsched up --demo`: the same trace slice under a baseline policy and under ours, compared.

One cluster serves both runs: its agent and workers stay up while the control plane is
restarted (same database) with the baseline policy (`fifo`) first and then with `up --policy`
(default `pecsched`), which keeps serving afterwards. Each run replays the same requests (the
same arrivals, lengths and prompt token ids) and prints its per-class table; then the two are
printed side by side with the change, and a PNG of both runs' short queueing-delay
distributions is written to the log directory. Requests of the baseline still running when its
drain deadline passes are cancelled before the switch, so they never run under the next policy.

Load rule (`pecsched/demo_load.py`): before the baseline's run, a short calibration on the
cluster under the baseline measures a few requests alone; the arrival rate is then the one at
which the slice's work fills 70% of the instances that really run in parallel (at most one per
CPU core) over the replay window (60 s), and the slice is what arrives in that window. So the
load follows the machine's speed (and whatever else loads it) instead of a fixed rate that left
the workers idle on a quiet box and overloaded them on a busy one. On CPU `up` starts one
general worker per core (at most 3) plus the short-decode worker, each with one torch thread,
so a worker freed from a long prefill has a core to give to the shorts. Lengths are scaled to
what `tiny` on a CPU serves: shorts ~15-600 prompt tokens, the trace's long prompts spread
over 4,000-16,000 tokens (the model's 16,384 positions, less the outputs), so that a long
prefill holds a worker for seconds and preemption, colocation and KV transfer all happen; the
control plane's long threshold (1,024 tokens) and chunk size are set to match (see `up.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pecsched.cluster import LocalCluster
    from pecsched.replay_report import ReplayReport
    from sim.metrics import FloatArray

BASELINE_POLICY = "fifo"
DEMO_DURATION_S = 60.0  # seconds of (compressed) arrivals replayed under each policy
PLOT_NAME = "demo-short-queueing-delay.png"
_DEVICE_NAMES = {"cpu": "CPU cores", "cuda": "GPUs"}
_PLOT_FLOOR_S = 1e-3  # a log axis cannot show 0: shorter delays are drawn at 1 ms


@dataclass(frozen=True, slots=True)
class DemoShape:
    """How the demo scales the trace for one device."""

    token_scale: float  # short prompts and outputs
    long_rescale: str  # LOW:HIGH tokens for the trace's long prompts
    max_output_tokens: int


DEMO_SHAPES = {
    "cpu": DemoShape(0.15, "4000:16000", 64),  # tiny: threshold 1,024, 16,384-token pools
    # A real preset on one GPU: real short lengths, longs up to what a few workers hold
    # (NOTE(helper-9): not yet run on a GPU, so no load rule was measured there).
    "cuda": DemoShape(1.0, "8000:32000", 256),
}


class StatusLine(Protocol):
    """The live status line `up` shows while a replay runs."""

    def start(self) -> None:
        """Start showing it."""

    def stop(self) -> None:
        """Stop showing it (returns when it is gone)."""


def run_demo(
    args: argparse.Namespace,
    cluster: LocalCluster,
    status_line: Callable[[], StatusLine],
    parallel_devices: int,
) -> int:
    """Calibrate the load (`pecsched/demo_load.py`) under BASELINE_POLICY, replay the slice
    under it and under `args.policy` on `cluster` (left running `args.policy`), print the rule
    and what it chose, both tables, the comparison and the plot's path. `parallel_devices`:
    CPU cores (cpu) or GPUs (cuda) the workers share.

    Returns 0 when every request of both runs finished, else 1.
    """
    import asyncio
    import time

    from pecsched.demo_load import plan_demo_load
    from pecsched.replay import run_replay
    from pecsched.replay_report import format_comparison

    policies = [BASELINE_POLICY, args.policy] if args.policy != BASELINE_POLICY else [args.policy]
    options = _replay_options(args)
    servers = min(cluster.spec.num_instances, parallel_devices)
    started = time.monotonic()
    reports: list[tuple[str, ReplayReport]] = []
    for policy in policies:
        if cluster.spec.policy != policy:
            print(f"switching the control plane to policy {policy}", flush=True)
            cluster.restart_controlplane(policy, ready_timeout_s=120.0)
        if policy == policies[0]:
            print(f"calibrating the demo's load under {policy}...", flush=True)
            load = asyncio.run(plan_demo_load(_traces(args), options, cluster.spec.target, servers))
            options.time_scale = load.time_scale
            print(
                f"demo: the same requests under {' and '.join(policies)} on "
                f"{cluster.spec.num_instances} {cluster.spec.agents[0].model} workers sharing "
                f"{parallel_devices} {_DEVICE_NAMES[args.device]} (1 torch thread each on cpu)\n"
                f"{load.describe(options.duration)}",
                flush=True,
            )
        status = status_line()
        status.start()
        try:
            report = asyncio.run(run_replay(_traces(args), options, cluster.spec.target, None))
        finally:
            status.stop()
        print(report.table, flush=True)
        reports.append((policy, report))
        if policy != policies[-1]:
            _cancel_active(cluster.spec.target)
    if len(reports) == 2:
        print(f"\nthe same requests under {' and '.join(policies)}:", flush=True)
        print(format_comparison(reports[0], reports[1]), flush=True)
    plot_path = Path(args.log_dir).resolve() / PLOT_NAME
    plot_short_queueing_delays([(name, r.short_queueing_delay_s) for name, r in reports], plot_path)
    print(f"plot of the short queueing delays: {plot_path}", flush=True)
    print(
        f"demo part (calibration, both runs, plot): {time.monotonic() - started:.0f} s", flush=True
    )
    return 0 if all(r.num_failed == 0 for _, r in reports) else 1


def _replay_options(args: argparse.Namespace) -> argparse.Namespace:
    from pecsched.replay import replay_options

    shape = DEMO_SHAPES[args.device]
    return replay_options(
        token_scale=shape.token_scale,
        long_rescale=shape.long_rescale,
        max_output_tokens=shape.max_output_tokens,
        duration=args.demo_duration,
        drain_timeout=max(60.0, args.demo_duration),
    )


def _traces(args: argparse.Namespace) -> list[str]:
    from sim.workloads import AZURE_TRACES

    return args.trace or [str(p) for p in AZURE_TRACES]


def _cancel_active(target: str) -> None:
    from sdk.client import Client
    from sdk.types import RequestState

    active = [s for s in RequestState if not s.is_terminal and s is not RequestState.UNSPECIFIED]
    with Client(target) as client:
        leftovers = list(client.list_requests(states=active, page_size=1000))
        for info in leftovers:
            client.cancel(info.request_id)
    if leftovers:
        print(f"cancelled {len(leftovers)} unfinished requests of the run", file=sys.stderr)


def plot_short_queueing_delays(samples: Sequence[tuple[str, FloatArray]], path: Path) -> None:
    """Write a PNG to `path`: per policy (name, each short's queueing delay in seconds), the
    empirical CDF on a log axis with its p99 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, delays_s in samples:
        if len(delays_s) == 0:
            continue
        x = np.sort(np.maximum(delays_s, _PLOT_FLOOR_S))
        y = np.arange(1, len(x) + 1) / len(x)
        p99_s = float(np.percentile(delays_s, 99))
        (line,) = ax.step(x, y, where="post", label=f"{name}: p99 {p99_s:.3f} s")
        ax.axvline(max(p99_s, _PLOT_FLOOR_S), color=line.get_color(), linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("short queueing delay, arrival -> first scheduled (s; < 1 ms drawn at 1 ms)")
    ax.set_ylabel("fraction of short requests")
    ax.set_title("the same trace slice under each policy (dotted: p99)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
