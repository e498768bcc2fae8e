"""Simulator speed: the issue's two wall-time targets, measured on this machine.

    python bench/sim_scale.py [--skip-large] [--large-gpus 10000] [--large-requests 1000000]
        [--large-policies pecsched,fifo] [--json OUT]

A. The one-hour merged Azure trace (28,185 requests) on 32 x A100 with Mistral-7B, the four
   policies in one process per CPU (as `pecsched sim` runs them): target < 30 s in total.
   Also reports the CPU seconds, i.e. the time of a serial run on an idle machine.
B. 10,000 GPUs with >= 1,000,000 requests: the merged trace tiled (circularly time-shifted
   copies, one per 32 GPUs) so the per-GPU load equals the 32-GPU run's, cut at the first N
   arrivals; events are handed to the policy in 5 ms windows. Target < 10 minutes per policy.
   Reports the policy's cost per observe+schedule round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane.core.config import SchedulerConfig  # noqa: E402
from sim import workloads as wl  # noqa: E402
from sim.cost_model import CostModel  # noqa: E402
from sim.engine import ClusterSpec  # noqa: E402
from sim.hardware import GPUS, MODELS  # noqa: E402
from sim.report import PolicyResult, result_to_dict, table  # noqa: E402
from sim.runner import run_policy  # noqa: E402

POLICIES = ("fifo", "reservation", "priority", "pecsched")


def _small_run(job: tuple[wl.Workload, CostModel, str]) -> PolicyResult:
    base, cost, policy = job
    return run_policy(base, ClusterSpec(32, cost), policy, SchedulerConfig()).result


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--large-gpus", type=int, default=10_000)
    ap.add_argument("--large-requests", type=int, default=1_000_000)
    ap.add_argument("--large-policies", default="pecsched")
    ap.add_argument(
        "--large-time-scale",
        type=float,
        default=1.33,
        help="arrival stretch of the tiled trace (1.33 = offered prefill load 0.75)",
    )
    ap.add_argument("--window-s", type=float, default=0.005)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = wl.rescale_long(wl.load_azure_traces(list(wl.AZURE_TRACES)), 100_000, 500_000, "minmax")
    cost = CostModel(MODELS["mistral-7b"], GPUS["a100"], 1)
    report: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    }
    if not args.skip_small:
        started = time.perf_counter()
        cpu_before = _children_cpu_s()
        workers = min(len(POLICIES), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            small = list(pool.map(_small_run, [(base, cost, p) for p in POLICIES]))
        total = time.perf_counter() - started
        cpu = _children_cpu_s() - cpu_before
        print(table(small))
        print(
            f"A. one-hour merged trace, 32 GPUs, 4 policies: {total:.1f} s wall on {workers} "
            f"processes, {cpu:.1f} s of CPU (serial equivalent); target < 30 s"
        )
        report["small"] = {
            "total_wall_s": total,
            "cpu_s": cpu,
            "processes": workers,
            "results": [result_to_dict(r) for r in small],
        }
    if not args.skip_large:
        copies = math.ceil(args.large_gpus / 32)
        tiled = wl.tile(base, copies, seed=0)
        workload = wl.head(wl.scale_time(tiled, args.large_time_scale), args.large_requests)
        print(
            f"B. {len(workload):,} requests over {workload.duration_s:.0f} s on "
            f"{args.large_gpus:,} GPUs",
            flush=True,
        )
        large = []
        for policy in args.large_policies.split(","):
            out = run_policy(
                workload,
                ClusterSpec(args.large_gpus, cost),
                policy,
                SchedulerConfig(),
                batch_window_s=args.window_s,
            )
            r = out.result
            print(
                f"   {policy}: {r.wall_s:.0f} s wall (target < 600 s), {r.num_events:,} events, "
                f"{r.schedule_calls:,} rounds, policy {r.schedule_wall_s:.0f} s = "
                f"{r.schedule_wall_s / max(r.schedule_calls, 1) * 1e6:.0f} us per round",
                flush=True,
            )
            large.append(r)
        print(table(large))
        report["large"] = {
            "gpus": args.large_gpus,
            "requests": len(workload),
            "window_s": args.window_s,
            "results": [result_to_dict(r) for r in large],
        }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
