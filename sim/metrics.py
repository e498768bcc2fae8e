"""Metrics by request class, from per-request records. Pure functions returning data.

Definitions (all times in seconds, measured on the simulated clock):

* queueing delay = when the request's prefill first starts executing − arrival. For a short
  that preempts a long prefill this includes the wait for the long's chunk in flight (the
  policy's decision, `RequestView.first_scheduled_s`, comes earlier). A request the run never
  started counts with `end − arrival` (a lower bound), so backlog is not hidden.
* TTFT = first output token − arrival; TBT (time between tokens) of one request =
  (finish − first token) / (output tokens − 1), reported over requests with >= 2 tokens.
* JCT = finish − arrival.
* short throughput = finished short requests / (last short finish − first short arrival);
  short makespan throughput (the paper's) = finished short requests / makespan.
* makespan = last finish of any request − first arrival.
* SLO attainment = share of short requests that finished with TTFT <= `slo_ttft_s` and a
  per-request TBT p99 <= `tbt_slo_s`. A request's p99 is the nearest-rank one over its
  output − 1 token gaps, so it holds when at most gaps − ceil(0.99 gaps) gaps exceed the SLO
  (none below 100 gaps). The simulator counts, per request, the decode iterations longer than
  the SLO plus the handoff from the first token to the decode start when that alone is longer
  (`RequestRecords.tbt_gaps_over_slo`).
* long starvation rate = fraction of long requests that did not finish by the end of the run or
  whose JCT exceeds `starvation_factor` x their isolated JCT (the same request alone on an idle
  cluster, prefilled on the fewest instances that hold its KV, then decoded alone).
* preemptions = total pauses of running prefills, over all requests.
* GPU idle rate = Σ idle GPU-seconds / Σ (busy + idle) over [first arrival, makespan end].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_STARVATION_FACTOR = 5.0  # JCT above this multiple of the isolated JCT counts as starved
DEFAULT_SLO_TTFT_S = 1.0  # a short's time to first token within this meets the SLO
DEFAULT_SLO_TBT_S = 0.1  # a short's per-request TBT p99 within this meets the SLO
PERCENTILES = (1, 25, 50, 75, 99)


@dataclass(frozen=True, slots=True)
class RequestRecords:
    """Per-request outcomes, columnar; NaN marks an event that never happened."""

    is_long: BoolArray  # class: prompt >= the long threshold
    arrival_s: FloatArray
    first_scheduled_s: FloatArray  # its prefill first started executing
    first_token_s: FloatArray  # prefill finished and the first token was out
    finished_s: FloatArray
    output_tokens: IntArray
    preemptions: IntArray  # times the request's prefill was paused
    isolated_jct_s: FloatArray  # JCT alone on an idle cluster (starvation reference)
    # Token gaps longer than `tbt_slo_s`, per request; None when not measured (SLO attainment
    # is then NaN).
    tbt_gaps_over_slo: IntArray | None = None
    tbt_slo_s: float = DEFAULT_SLO_TBT_S

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        for field in self.__slots__:
            value = getattr(self, field)
            if isinstance(value, np.ndarray) and len(value) != n:
                raise ValueError(f"RequestRecords.{field} has a different length than arrival_s")


@dataclass(frozen=True, slots=True)
class ShortMetrics:
    """Metrics of short requests."""

    count: int  # short requests in the workload
    queueing_delay_s: dict[str, float]  # "p1".."p99"
    ttft_s: dict[str, float]  # "p50", "p99"
    tbt_s: dict[str, float]  # "p50", "p99" of per-request mean TBT
    throughput_rps: float  # finished shorts over the span of short requests
    throughput_makespan_rps: float  # finished shorts over the run's makespan (the paper's)
    slo_attainment: float  # 0..1, see the module docstring; NaN when gaps were not measured


@dataclass(frozen=True, slots=True)
class LongMetrics:
    """Metrics of long requests."""

    count: int
    queueing_delay_s: dict[str, float]  # "p50", "p99"
    jct_mean_s: float  # over finished long requests
    jct_p99_s: float
    starvation_rate: float
    preemptions_total: int


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything one simulation run reports."""

    short: ShortMetrics
    long: LongMetrics
    preemptions_total: int  # over all requests
    gpu_idle_rate: float
    makespan_s: float


def percentiles(values: FloatArray, which: tuple[int, ...]) -> dict[str, float]:
    """{"pX": value} for each X in `which` (linear interpolation); NaN when `values` is empty."""
    if len(values) == 0:
        return {f"p{q}": float("nan") for q in which}
    got = np.percentile(values, which)
    return {f"p{q}": float(v) for q, v in zip(which, got, strict=True)}


def queueing_delay_s(records: RequestRecords, mask: BoolArray, end_s: float) -> FloatArray:
    """Queueing delays of the masked requests (never scheduled: end − arrival)."""
    start = np.where(np.isnan(records.first_scheduled_s), end_s, records.first_scheduled_s)
    return (start - records.arrival_s)[mask]


def tbt_s(records: RequestRecords, mask: BoolArray) -> FloatArray:
    """Mean time between tokens of each masked finished request with >= 2 output tokens."""
    ok = mask & ~np.isnan(records.finished_s) & (records.output_tokens >= 2)
    span = records.finished_s[ok] - records.first_token_s[ok]
    return span / (records.output_tokens[ok] - 1)


def slo_attained(records: RequestRecords, mask: BoolArray, slo_ttft_s: float) -> BoolArray:
    """Per masked request: finished, TTFT <= `slo_ttft_s` and TBT p99 <= `records.tbt_slo_s`
    (nearest rank over its token gaps). Requires `records.tbt_gaps_over_slo`."""
    if records.tbt_gaps_over_slo is None:
        raise ValueError("slo_attained: the records have no tbt_gaps_over_slo")
    gaps = np.maximum(records.output_tokens - 1, 0)
    allowed = gaps - (99 * gaps + 99) // 100  # gaps above the nearest-rank p99
    ttft = records.first_token_s - records.arrival_s
    ok = ~np.isnan(records.finished_s) & (ttft <= slo_ttft_s)
    ok &= records.tbt_gaps_over_slo <= allowed
    return ok[mask]


def starvation_rate(records: RequestRecords, mask: BoolArray, factor: float) -> float:
    """Fraction of masked requests unfinished or with JCT > factor x isolated JCT."""
    total = int(mask.sum())
    if total == 0:
        return 0.0
    jct = records.finished_s[mask] - records.arrival_s[mask]
    starved = np.isnan(jct) | (jct > factor * records.isolated_jct_s[mask])
    return float(starved.sum()) / total


def gpu_idle_rate(busy_gpu_s: float, num_gpus: int, makespan_s: float) -> float:
    """Σ idle / Σ (busy + idle) over `num_gpus` GPUs for `makespan_s`."""
    total = num_gpus * makespan_s
    if total <= 0:
        return 0.0
    return max(0.0, total - busy_gpu_s) / total


def summarize(
    records: RequestRecords,
    busy_gpu_s: float,
    num_gpus: int,
    end_s: float,
    starvation_factor: float = DEFAULT_STARVATION_FACTOR,
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
) -> Summary:
    """All metrics of one run that ended at simulated time `end_s` (the TBT SLO is the one the
    records' gaps were counted against)."""
    short = ~records.is_long
    long = records.is_long
    done = ~np.isnan(records.finished_s)
    first_arrival = float(records.arrival_s.min()) if len(records.arrival_s) else 0.0
    last_finish = float(records.finished_s[done].max()) if done.any() else first_arrival
    makespan = last_finish - first_arrival

    short_done = short & done
    num_short_done = int(short_done.sum())
    if num_short_done:
        short_span = float(records.finished_s[short_done].max() - records.arrival_s[short].min())
        throughput = num_short_done / short_span if short_span > 0 else float("nan")
    else:
        throughput = 0.0
    throughput_makespan = num_short_done / makespan if makespan > 0 else float("nan")
    if records.tbt_gaps_over_slo is None or not short.any():
        attainment = float("nan")
    else:
        attainment = float(slo_attained(records, short, slo_ttft_s).mean())
    ttft = (records.first_token_s - records.arrival_s)[short & ~np.isnan(records.first_token_s)]

    jct = (records.finished_s - records.arrival_s)[long & done]
    short_metrics = ShortMetrics(
        count=int(short.sum()),
        queueing_delay_s=percentiles(queueing_delay_s(records, short, end_s), PERCENTILES),
        ttft_s=percentiles(ttft, (50, 99)),
        tbt_s=percentiles(tbt_s(records, short), (50, 99)),
        throughput_rps=throughput,
        throughput_makespan_rps=throughput_makespan,
        slo_attainment=attainment,
    )
    long_metrics = LongMetrics(
        count=int(long.sum()),
        queueing_delay_s=percentiles(queueing_delay_s(records, long, end_s), (50, 99)),
        jct_mean_s=float(jct.mean()) if len(jct) else float("nan"),
        jct_p99_s=float(np.percentile(jct, 99)) if len(jct) else float("nan"),
        starvation_rate=starvation_rate(records, long, starvation_factor),
        preemptions_total=int(records.preemptions[long].sum()),
    )
    return Summary(
        short=short_metrics,
        long=long_metrics,
        preemptions_total=int(records.preemptions.sum()),
        gpu_idle_rate=gpu_idle_rate(busy_gpu_s, num_gpus, makespan),
        makespan_s=makespan,
    )
