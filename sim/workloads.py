"""Workloads: Azure LLM inference traces and seeded synthetic generators.

Trace data: "Azure LLM inference trace 2023" (code and conversation services, one hour of
invocations each), published by Microsoft under CC BY 4.0 with Splitwise: P. Patel, E. Choukse,
C. Zhang, A. Shah, Í. Goiri, S. Maleki, R. Bianchini, "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024. Columns: TIMESTAMP, ContextTokens, GeneratedTokens.
Both files ship with the package in `sim/traces/` (provenance and license: `TRACES_LICENSE.md`
there); `AZURE_TRACES` names them wherever the package runs from.

A workload is three parallel arrays sorted by arrival; every transformation returns a new one.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

LONG_THRESHOLD_TOKENS = 4096  # the paper's short/long boundary on prompt length
RescaleMode = Literal["minmax", "quantile"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sorted by arrival: parallel arrays, one entry per request."""

    arrival_s: FloatArray  # arrival time, seconds from the first arrival
    prompt_tokens: IntArray  # input length
    output_tokens: IntArray  # tokens to generate (>= 1)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("Workload arrays must have equal lengths")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError("Workload.arrival_s must be non-negative and sorted")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("Workload prompt_tokens and output_tokens must be >= 1")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate (requests per second over the trace's span)."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else 0.0


TRACE_DIR = Path(__file__).resolve().with_name("traces")
AZURE_TRACES: tuple[Path, ...] = (
    TRACE_DIR / "AzureLLMInferenceTrace_code.csv",
    TRACE_DIR / "AzureLLMInferenceTrace_conv.csv",
)  # the two bundled Azure 2023 traces, in the order `pecsched sim` merges them by default


def _make(arrival_s: FloatArray, prompt: IntArray, output: IntArray) -> Workload:
    order = np.argsort(arrival_s, kind="stable")
    arrival = arrival_s[order]
    if len(arrival):
        arrival = arrival - arrival[0]
    return Workload(arrival, prompt[order], np.maximum(output[order], 1))


def load_azure_traces(paths: list[str | Path]) -> Workload:
    """Load and merge Azure trace CSVs by timestamp (arrivals relative to the first one).

    Raises ValueError naming the file and column when a row cannot be parsed.
    """
    if not paths:
        raise ValueError("trace: at least one file is needed")
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for path in paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(
                reader.fieldnames or []
            )
            if missing:
                raise ValueError(f"trace {path}: missing columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    stamp = row["TIMESTAMP"].strip()
                    # Seven fractional digits: keep microseconds for strptime.
                    if "." in stamp:
                        head, frac = stamp.split(".", 1)
                        stamp = f"{head}.{frac[:6]}"
                    times.append(datetime.fromisoformat(stamp).timestamp())
                    prompts.append(int(row["ContextTokens"]))
                    outputs.append(int(row["GeneratedTokens"]))
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"trace {path}: line {line}: {exc}") from None
    return _make(
        np.array(times, dtype=np.float64),
        np.maximum(np.array(prompts, dtype=np.int64), 1),
        np.array(outputs, dtype=np.int64),
    )


AZURE_EPOCH = datetime(2023, 11, 16)  # written traces start here (only differences matter)


def write_azure_csv(workload: Workload, path: str | Path) -> None:
    """Write `workload` in the Azure trace format that `load_azure_traces` reads back (arrivals
    to the microsecond)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for arrival, prompt, output in zip(
            workload.arrival_s, workload.prompt_tokens, workload.output_tokens, strict=True
        ):
            stamp = AZURE_EPOCH + timedelta(seconds=float(arrival))
            writer.writerow([stamp.isoformat(sep=" ", timespec="microseconds"), prompt, output])


def scale_time(workload: Workload, factor: float) -> Workload:
    """Stretch (factor > 1) or compress (factor < 1) inter-arrival times."""
    if factor <= 0:
        raise ValueError(f"time_scale must be > 0, got {factor}")
    return Workload(workload.arrival_s * factor, workload.prompt_tokens, workload.output_tokens)


def set_rate(workload: Workload, rate_rps: float) -> Workload:
    """Scale arrivals so the mean rate becomes `rate_rps` requests per second."""
    if rate_rps <= 0:
        raise ValueError(f"rate must be > 0, got {rate_rps}")
    if workload.rate_rps == 0:
        raise ValueError("rate: the workload needs two distinct arrival times")
    return scale_time(workload, workload.rate_rps / rate_rps)


def head(workload: Workload, max_requests: int) -> Workload:
    """The first `max_requests` arrivals."""
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    n = min(max_requests, len(workload))
    return Workload(workload.arrival_s[:n], workload.prompt_tokens[:n], workload.output_tokens[:n])


def rescale_long(
    workload: Workload,
    low_tokens: int = 100_000,
    high_tokens: int = 500_000,
    mode: RescaleMode = "minmax",
    threshold_tokens: int = LONG_THRESHOLD_TOKENS,
) -> Workload:
    """Map prompts >= `threshold_tokens` into [low_tokens, high_tokens]; shorter ones stay.

    `minmax` (the paper's mapping) is linear between the smallest and largest long prompt, so a
    single outlier squeezes every other long prompt towards `low_tokens`. `quantile` maps each
    long prompt's rank among the long prompts (ties share their mean rank) linearly onto the
    range instead, which keeps the spread whatever the outliers.
    """
    if not threshold_tokens <= low_tokens <= high_tokens:
        raise ValueError(
            f"long_rescale: need threshold {threshold_tokens} <= low {low_tokens} "
            f"<= high {high_tokens}"
        )
    prompt = workload.prompt_tokens.copy()
    is_long = prompt >= threshold_tokens
    values = prompt[is_long].astype(np.float64)
    if len(values) == 0:
        return workload
    if mode == "minmax":
        span = values.max() - values.min()
        frac = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    elif mode == "quantile":
        if len(values) == 1:
            frac = np.zeros(1)
        else:
            sorted_values = np.sort(values)
            lo = np.searchsorted(sorted_values, values, side="left")
            hi = np.searchsorted(sorted_values, values, side="right") - 1
            frac = (lo + hi) / 2.0 / (len(values) - 1)
    else:
        raise ValueError(f"long_rescale_mode must be 'minmax' or 'quantile', got {mode!r}")
    prompt[is_long] = np.rint(low_tokens + frac * (high_tokens - low_tokens)).astype(np.int64)
    return Workload(workload.arrival_s, prompt, workload.output_tokens)


def tile(workload: Workload, copies: int, seed: int) -> Workload:
    """Superimpose `copies` circularly time-shifted copies: `copies` x the rate, same mix.

    Each copy is rotated by a seeded uniform offset within the trace's span, so the merged
    arrival process stays stationary (no burst at t = 0). Used to scale a 32-GPU trace to a
    cluster `copies` times larger at the same per-GPU load.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    rng = np.random.default_rng(seed)
    span = workload.duration_s
    parts = [workload.arrival_s]
    for _ in range(copies - 1):
        shift = rng.uniform(0.0, span) if span > 0 else 0.0
        parts.append(np.mod(workload.arrival_s + shift, span) if span > 0 else workload.arrival_s)
    return _make(
        np.concatenate(parts),
        np.tile(workload.prompt_tokens, copies),
        np.tile(workload.output_tokens, copies),
    )


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """A seeded synthetic workload."""

    num_requests: int  # requests to generate
    rate_rps: float  # mean arrival rate
    long_fraction: float = 0.05  # share of long requests
    short_prompt_tokens: tuple[int, int] = (64, 4095)  # uniform range, inclusive
    long_prompt_tokens: tuple[int, int] = (100_000, 500_000)  # uniform range, inclusive
    output_tokens: tuple[int, int] = (8, 512)  # uniform range, inclusive
    burstiness_cv: float = 1.0  # coefficient of variation of inter-arrivals (1 = Poisson)

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.rate_rps <= 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")
        if self.burstiness_cv <= 0:
            raise ValueError(f"burstiness_cv must be > 0, got {self.burstiness_cv}")
        for name in ("short_prompt_tokens", "long_prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= low <= high, got {(lo, hi)}")


def _arrivals(rng: np.random.Generator, n: int, rate_rps: float, cv: float) -> FloatArray:
    """`n` arrival times from 0 with gamma inter-arrivals of mean 1/rate and coefficient of
    variation `cv` (1 = Poisson; above 1 the requests come in bursts)."""
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate_rps * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(spec: SyntheticSpec, seed: int) -> Workload:
    """Generate `spec` with `seed`: gamma inter-arrivals (Poisson when cv = 1, bursty above)."""
    rng = np.random.default_rng(seed)
    n = spec.num_requests
    arrival = _arrivals(rng, n, spec.rate_rps, spec.burstiness_cv)
    is_long = rng.random(n) < spec.long_fraction
    short = rng.integers(spec.short_prompt_tokens[0], spec.short_prompt_tokens[1] + 1, size=n)
    long = rng.integers(spec.long_prompt_tokens[0], spec.long_prompt_tokens[1] + 1, size=n)
    output = rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1, size=n)
    prompt = np.where(is_long, long, short).astype(np.int64)
    return Workload(arrival, prompt, output.astype(np.int64))


@dataclass(frozen=True, slots=True)
class LogNormal:
    """A log-normal length distribution truncated to [low, high] tokens (by redrawing)."""

    median_tokens: float  # exp(mu)
    sigma: float  # standard deviation of the log
    low: int  # smallest length kept
    high: int  # largest length kept

    def __post_init__(self) -> None:
        if self.sigma <= 0 or not 1 <= self.low <= self.median_tokens <= self.high:
            raise ValueError(f"LogNormal needs sigma > 0 and 1 <= low <= median <= high: {self}")

    def draw(self, rng: np.random.Generator, n: int) -> IntArray:
        """`n` seeded lengths; values outside [low, high] are drawn again."""
        mu = math.log(self.median_tokens)
        out = np.rint(rng.lognormal(mu, self.sigma, size=n)).astype(np.int64)
        bad = (out < self.low) | (out > self.high)
        while bad.any():
            out[bad] = np.rint(rng.lognormal(mu, self.sigma, size=int(bad.sum())))
            bad = (out < self.low) | (out > self.high)
        return out


@dataclass(frozen=True, slots=True)
class HeavyTailSpec:
    """A seeded workload with truncated log-normal lengths. By default short prompts have a
    median of 700 tokens (up to 4095), long prompts a median of 160K tokens with ~78% past 100K
    and a tail to 500K, outputs a median of 150 tokens (up to 4096)."""

    num_requests: int  # requests to generate
    rate_rps: float  # mean arrival rate
    long_fraction: float  # share of long requests (prompt >= LONG_THRESHOLD_TOKENS)
    burstiness_cv: float = 1.0  # coefficient of variation of inter-arrivals (1 = Poisson)
    short_prompt: LogNormal = LogNormal(700, 1.0, 16, LONG_THRESHOLD_TOKENS - 1)
    long_prompt: LogNormal = LogNormal(160_000, 0.6, LONG_THRESHOLD_TOKENS, 500_000)
    output: LogNormal = LogNormal(150, 1.0, 1, 4096)

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.rate_rps <= 0 or self.burstiness_cv <= 0:
            raise ValueError(f"HeavyTailSpec needs num_requests >= 1, rate and cv > 0: {self}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")


def heavy_tail(spec: HeavyTailSpec, seed: int) -> Workload:
    """Generate `spec` with `seed`: gamma inter-arrivals, then each request's class, prompt
    and output length; the same seed gives the same workload."""
    rng = np.random.default_rng(seed)
    n = spec.num_requests
    arrival = _arrivals(rng, n, spec.rate_rps, spec.burstiness_cv)
    is_long = rng.random(n) < spec.long_fraction
    prompt = spec.short_prompt.draw(rng, n)
    prompt[is_long] = spec.long_prompt.draw(rng, int(is_long.sum()))
    return Workload(arrival, prompt, spec.output.draw(rng, n))
