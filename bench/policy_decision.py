"""Policy decision time with a big backlog against a small one, per policy, in one run.

    python bench/policy_decision.py [--policies pecsched,fifo,priority,reservation]
        [--instances 1000] [--queued 10000] [--calls 2000] [--json OUT]

Each measured call observes a handful of completions and two arrivals, then schedules. The work
must be proportional to what changed, not to the queue or the cluster: a scan over all queued
requests or instances per call would make the large run's p99 grow with its size. The same-run
baseline is the same driver over a cluster and backlog 100 times smaller; the ratio large/small
is the number to watch (about 1 when the policy is flat). CPU time of this thread is measured
(other processes on a shared machine do not count); the collector is frozen after setup, as a
long-running driver does. Target: large p99 < 1 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane.core import actions as act  # noqa: E402
from controlplane.core import events as ev  # noqa: E402
from controlplane.core.config import SchedulerConfig  # noqa: E402
from controlplane.core.policies.registry import make_policy  # noqa: E402
from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec  # noqa: E402

POLICIES = ("pecsched", "fifo", "priority", "reservation")
KV_CAPACITY_TOKENS = 400_000


class SteadyDriver:
    """Completes the oldest work first, a few items per call, and keeps arrivals coming."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0
        self.prefilling: deque[str] = deque()
        self.in_place: set[str] = set()
        self.transferring: deque[tuple[str, str]] = deque()
        self.decoding: deque[str] = deque()

    def spec(self, at_s: float) -> RequestSpec:
        """A new request: 5% long (100K-300K prompt tokens), the rest short."""
        self.count += 1
        long = self.rng.random() < 0.05
        prompt = self.rng.randint(100_000, 300_000) if long else self.rng.randint(10, 4_000)
        return RequestSpec(f"r{self.count}", "tenant", prompt, 200, 0, at_s)

    def events(self, at_s: float) -> list[ev.Event]:
        """Up to 3 prefills, 3 transfers and 3 decodes end; 2 requests arrive."""
        out: list[ev.Event] = []
        for _ in range(min(3, len(self.prefilling))):
            request_id = self.prefilling.popleft()
            out.append(ev.PrefillDone(request_id, at_s))
            if request_id in self.in_place:
                self.decoding.append(request_id)
        for _ in range(min(3, len(self.transferring))):
            request_id, dst = self.transferring.popleft()
            out.append(ev.KVTransferDone(request_id, dst, True, at_s))
        for _ in range(min(3, len(self.decoding))):
            out.append(ev.RequestFinished(self.decoding.popleft(), at_s))
        out += [ev.RequestArrived(self.spec(at_s), at_s) for _ in range(2)]
        return out

    def apply(self, decision: act.Decision) -> None:
        """Start what the decision started, to be completed by later `events` calls."""
        for action in decision.actions:
            if isinstance(action, act.StartPrefill | act.Colocate):
                self.prefilling.append(action.request_id)
                if action.decode_in_place:
                    self.in_place.add(action.request_id)
            elif isinstance(action, act.TransferKV):
                self.transferring.append((action.request_id, action.dst_instance_id))
            elif isinstance(action, act.StartDecode):
                self.decoding.append(action.request_id)


@dataclass(frozen=True, slots=True)
class Run:
    """One policy over one cluster size."""

    policy: str
    num_instances: int
    num_queued: int  # requests left queued after the first decision
    min_queued: int  # fewest queued at any measured call's end (the backlog stayed)
    latencies_s: list[float]  # thread CPU time of each observe + schedule call, sorted

    def pct_us(self, q: float) -> float:
        """The q-quantile of the call times, in microseconds."""
        return self.latencies_s[int(q * (len(self.latencies_s) - 1))] * 1e6


def measure(name: str, num_instances: int, num_queued: int, num_calls: int) -> Run:
    """Fill every instance, leave `num_queued` requests queued, then time `num_calls` calls."""
    policy = make_policy(name, SchedulerConfig(), 0)
    policy.observe(
        [
            ev.InstanceUp(
                InstanceSpec(f"i{k:04d}", f"node-{k}", InstanceRole.GENERAL, 1, KV_CAPACITY_TOKENS),
                0.0,
            )
            for k in range(num_instances)
        ]
    )
    driver = SteadyDriver(seed=1)
    backlog = [driver.spec(0.0) for _ in range(num_queued + 2 * num_instances)]
    policy.observe([ev.RequestArrived(spec, 0.0) for spec in backlog])
    driver.apply(policy.schedule(0.0))
    min_queued = num_queued + 2 * num_instances
    latencies: list[float] = []
    gc.collect()
    gc.freeze()
    try:
        for call in range(1, num_calls + 1):
            now_s = call * 0.01
            events = driver.events(now_s)
            start = time.thread_time()
            policy.observe(events)
            decision = policy.schedule(now_s)
            latencies.append(time.thread_time() - start)
            driver.apply(decision)
            if call % 500 == 0:
                policy.take_completed()
                queued = sum(c.queued for c in policy.cluster_view(now_s).classes)
                min_queued = min(min_queued, queued)
    finally:
        gc.unfreeze()
    final = sum(c.queued for c in policy.cluster_view(num_calls * 0.01).classes)
    return Run(name, num_instances, num_queued, min(min_queued, final), sorted(latencies))


def main() -> int:
    """Print one row per policy: small (baseline) and large p50/p99 and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--instances", type=int, default=1_000)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=2_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    small_instances, small_queued = max(args.instances // 100, 1), max(args.queued // 100, 1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {args.calls:,} calls each, thread CPU time\n"
    )
    print(
        f"| policy | baseline {small_instances:,} inst / {small_queued:,} queued p50 / p99 us "
        f"| {args.instances:,} inst / {args.queued:,} queued p50 / p99 us | p99 ratio |"
    )
    print("|---|---:|---:|---:|")
    report = []
    for name in args.policies.split(","):
        small = measure(name, small_instances, small_queued, args.calls)
        large = measure(name, args.instances, args.queued, args.calls)
        if large.min_queued < 0.8 * args.queued:
            print(f"{name}: the backlog drained ({large.min_queued} queued): not measured")
            return 1
        print(
            f"| {name} | {small.pct_us(0.5):.0f} / {small.pct_us(0.99):.0f} | "
            f"{large.pct_us(0.5):.0f} / {large.pct_us(0.99):.0f} | "
            f"{large.pct_us(0.99) / max(small.pct_us(0.99), 1e-3):.2f} |",
            flush=True,
        )
        report.append(
            {
                "policy": name,
                "baseline": {"p50_us": small.pct_us(0.5), "p99_us": small.pct_us(0.99)},
                "large": {"p50_us": large.pct_us(0.5), "p99_us": large.pct_us(0.99)},
            }
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
