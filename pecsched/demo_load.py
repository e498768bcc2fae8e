"""The demo's load rule: a short calibration picks the arrival rate that loads the baseline.

Rule: the demo replays a fixed window (`--demo-duration`, 60 s) of the merged Azure traces,
compressed by the time scale `f` for which the slice's work fills `TARGET_BUSY` (70%) of the
cluster's parallel capacity over the window: work(slice(f)) = TARGET_BUSY x window x servers.
`servers` is what really runs in parallel: the instances, but at most the usable CPU cores on
CPU (workers that share a core add no compute) or the GPUs on cuda. A request's work is its
service time alone on one idle instance, measured just before the baseline's run on the
cluster itself under the baseline policy: a few of the trace's short requests one at a time
(their median serves for every short, so a burst of another job on the machine does not set
the rate) and one long prompt at each end of the long range (a long takes the power law of
its prompt length fitted through the two: attention makes a long prefill grow faster than its
length). At 70% the cluster is busy but stable, so queues form behind long prefills
(contention, where policies differ) and both runs drain. The probes also
warm every path the replays use, so neither policy runs on cold workers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pecsched.loadgen import PlannedRequest
    from sdk.aio import AsyncClient
    from sim.metrics import BoolArray, FloatArray, IntArray
    from sim.workloads import Workload

TARGET_BUSY = 0.7  # fraction of the parallel capacity the slice's work fills
NUM_SHORT_PROBES = 8  # shorts measured one at a time (after one unmeasured warm-up)
PROBE_SEED = 1  # prompt token ids of the probes (the replays use seed 0)
TRACE_HORIZON_S = 1800.0  # trace seconds the rule may draw the slice from
_SCALE_BOUNDS = (1e-3, 1e3)  # time scales searched
_BISECT_STEPS = 60


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """Service times alone on one idle instance (seconds), measured by `calibrate`."""

    short_s: float  # median over the short probes
    long_low: tuple[int, float]  # (prompt tokens, service time) of the shorter long probe
    long_high: tuple[int, float]  # the same for the longer one

    def work_s(self, prompt_tokens: IntArray, is_long: BoolArray) -> float:
        """Total service seconds of requests with these prompt lengths and classes: shorts at
        the median, longs on the power law t = t0 (p / p0)^k through the two long probes."""
        import numpy as np

        prompt = np.asarray(prompt_tokens, dtype=np.float64)
        (p0, t0), (p1, t1) = self.long_low, self.long_high
        exponent = math.log(t1 / t0) / math.log(p1 / p0) if p1 != p0 and t0 > 0 < t1 else 1.0
        longs = t0 * (np.maximum(prompt, 1.0) / p0) ** exponent
        return float(np.where(is_long, longs, self.short_s).sum())


@dataclass(frozen=True, slots=True)
class DemoLoad:
    """The time scale the rule chose and what it was computed from."""

    time_scale: float  # multiplies the trace's inter-arrival times
    servers: int  # instances that run in parallel
    model: ServiceModel
    trace_window_s: float  # trace seconds the slice covers
    num_requests: int
    num_long: int
    work_s: float  # estimated service seconds of the slice

    def describe(self, window_s: float) -> str:
        """Two lines for the demo's header."""
        m = self.model
        return (
            f"load rule: the slice's work fills {TARGET_BUSY:.0%} of {self.servers} parallel "
            f"instances over {window_s:.0f} s; calibrated alone under the baseline: short median "
            f"{m.short_s:.3f} s, long {m.long_low[1]:.2f} s at {m.long_low[0]} tokens and "
            f"{m.long_high[1]:.2f} s at {m.long_high[0]}\n"
            f"slice: the first {self.trace_window_s:.0f} s of the Azure traces "
            f"({self.num_requests} requests, {self.num_long} long, ~{self.work_s:.0f} s of work) "
            f"at {1 / self.time_scale:.2f}x their arrival rate (time scale {self.time_scale:.3f})"
        )


def choose_time_scale(
    arrival_s: FloatArray,
    work_of_first: Callable[[int], float],
    window_s: float,
    servers: int,
    target_busy: float = TARGET_BUSY,
) -> float:
    """The smallest time scale f (within the searched bounds) at which the requests arriving
    before `window_s` after scaling have at most `target_busy x servers x window_s` of work.

    `arrival_s` is sorted; `work_of_first(n)` is the work of the first n >= 1 requests and
    does not decrease with n. ValueError on an empty trace or bad arguments.
    """
    import numpy as np

    if len(arrival_s) == 0:
        raise ValueError("choose_time_scale needs at least one arrival")
    if window_s <= 0 or servers < 1 or not 0 < target_busy <= 1:
        raise ValueError(f"bad window {window_s}, servers {servers} or target {target_busy}")
    budget = target_busy * servers * window_s

    def fits(f: float) -> bool:
        n = int(np.searchsorted(arrival_s * f, window_s, "left"))
        return work_of_first(max(n, 1)) <= budget

    lo, hi = _SCALE_BOUNDS
    if fits(lo):
        return lo
    for _ in range(_BISECT_STEPS):  # geometric bisection: fits() is monotone in f
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


async def calibrate(
    client: AsyncClient,
    workload: Workload,
    is_long: BoolArray,
    long_range: tuple[int, int],
    max_output_tokens: int,
) -> ServiceModel:
    """Measure the service model on the live cluster: probes one at a time, each alone.

    `workload` holds the lengths as they will be sent (its shorts are sampled), `is_long`
    marks its long requests, `long_range` is (LOW, HIGH) of the long prompts.
    """
    import numpy as np

    from sim.workloads import Workload

    shorts = np.flatnonzero(~is_long)
    if len(shorts) == 0:
        raise ValueError("the demo slice has no short requests to calibrate with")
    picks = shorts[np.linspace(0, len(shorts) - 1, NUM_SHORT_PROBES + 1).astype(np.int64)]
    low, high = long_range
    probes = Workload(
        np.zeros(len(picks) + 2),
        np.concatenate([workload.prompt_tokens[picks], [low, high]]).astype(np.int64),
        np.concatenate([workload.output_tokens[picks], [max_output_tokens] * 2]).astype(np.int64),
    )
    from pecsched.replay import plan_requests

    times = [await _service_alone(client, probe) for probe in plan_requests(probes, PROBE_SEED)]
    short_times = times[1 : len(picks)]  # the first short warms the path up, unmeasured
    return ServiceModel(
        short_s=float(np.median(short_times)),
        long_low=(low, times[-2]),
        long_high=(high, times[-1]),
    )


async def _service_alone(client: AsyncClient, probe: PlannedRequest) -> float:
    """Seconds from first scheduled to finished of `probe`, sent alone."""
    from pecsched.loadgen import measured_from_info
    from sdk.types import Sampling

    started = time.monotonic()
    ack = await client.submit(
        probe.prompt_token_ids,
        max_new_tokens=probe.max_new_tokens,
        sampling=Sampling(stop_at_eos=False),
    )
    await client.result(ack.request_id)
    m = measured_from_info(await client.get(ack.request_id))
    if m.state.value != "finished" or math.isnan(m.first_scheduled_s):
        raise RuntimeError(f"calibration request {ack.request_id} ended {m.state.value}")
    service_s = m.finished_s - m.first_scheduled_s
    print(
        f"  probe {len(probe.prompt_token_ids)} tokens: {service_s:.3f} s "
        f"({time.monotonic() - started:.1f} s wall)",
        file=sys.stderr,
        flush=True,
    )
    return service_s


async def plan_demo_load(
    traces: Sequence[str], options: argparse.Namespace, target: str, servers: int
) -> DemoLoad:
    """Calibrate on the cluster at `target` (running the baseline) and apply the load rule to
    `traces` shaped by the replay `options` (their `duration` is the window; their
    `time_scale` is ignored: it is what this chooses)."""

    from pecsched.loadgen import first_snapshot
    from pecsched.replay import capacity_limits, length_plan, parse_low_high, scale_lengths
    from sdk.aio import AsyncClient
    from sim import workloads as wl

    if options.long_rescale is None:
        raise ValueError("the demo's load rule needs a long range (--long-rescale)")
    trace = wl.load_azure_traces(list(traces))
    trace = wl.head(trace, max(1, int((trace.arrival_s < TRACE_HORIZON_S).sum())))
    async with AsyncClient(target, timeout_s=60.0) as client:
        snapshot = await first_snapshot(client, timeout_s=30.0)
        if snapshot is None:
            raise ValueError("the demo's calibration needs to Watch the cluster (admin key)")
        lengths = length_plan(options, *capacity_limits(snapshot))
        is_long = trace.prompt_tokens >= lengths.long_threshold_tokens
        model = await calibrate(
            client,
            scale_lengths(trace, lengths),
            is_long,
            parse_low_high(options.long_rescale, "--long-rescale"),
            options.max_output_tokens,
        )

    def work_of_first(n: int) -> float:
        # Long prompts are spread by rank within the slice, as the replay will send them.
        return model.work_s(scale_lengths(wl.head(trace, n), lengths).prompt_tokens, is_long[:n])

    window_s = float(options.duration)
    scale = choose_time_scale(trace.arrival_s, work_of_first, window_s, servers)
    n = max(1, int((trace.arrival_s * scale < window_s).sum()))
    return DemoLoad(
        time_scale=scale,
        servers=servers,
        model=model,
        trace_window_s=window_s / scale,
        num_requests=n,
        num_long=int(is_long[:n].sum()),
        work_s=work_of_first(n),
    )
