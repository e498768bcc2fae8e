"""Turn simulation results into the JSON contract of `pecsched sim` and a text table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sim.metrics import Summary


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One policy's run: its metrics and what the run cost."""

    policy: str  # registry name
    summary: Summary
    wall_s: float  # real seconds the simulation took
    schedule_calls: int  # schedule(now_s) calls made
    schedule_wall_s: float  # real seconds spent inside observe + schedule (the policy's cost)
    num_events: int  # simulator events processed


def _num(value: float) -> float | None:
    """JSON has no NaN: missing values become null."""
    return None if math.isnan(value) else value


def _nums(values: dict[str, float]) -> dict[str, float | None]:
    return {k: _num(v) for k, v in values.items()}


def result_to_dict(result: PolicyResult) -> dict[str, Any]:
    """The per-policy object of the `pecsched sim --json` contract (plus a few extra keys)."""
    s = result.summary
    calls = max(result.schedule_calls, 1)
    return {
        "policy": result.policy,
        "short": {
            "count": s.short.count,
            "queueing_delay_s": _nums(s.short.queueing_delay_s),
            "ttft_s": _nums(s.short.ttft_s),
            "tbt_s": _nums(s.short.tbt_s),
            "throughput_rps": _num(s.short.throughput_rps),
        },
        "long": {
            "count": s.long.count,
            "queueing_delay_s": _nums(s.long.queueing_delay_s),
            "jct_mean_s": _num(s.long.jct_mean_s),
            "jct_p99_s": _num(s.long.jct_p99_s),
            "starvation_rate": s.long.starvation_rate,
            "preemptions_total": s.long.preemptions_total,
        },
        "preemptions_total": s.preemptions_total,
        "gpu_idle_rate": s.gpu_idle_rate,
        "makespan_s": s.makespan_s,
        "wall_s": result.wall_s,
        "policy_cost": {
            "schedule_calls": result.schedule_calls,
            "per_decision_us": result.schedule_wall_s / calls * 1e6,
            "events": result.num_events,
        },
    }


def _fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def table(results: list[PolicyResult]) -> str:
    """A fixed-width table, one row per policy."""
    header = (
        f"{'policy':<20} {'short':>7} {'qd p50':>8} {'qd p99':>9} {'ttft p99':>9} "
        f"{'short rps':>9} {'long':>5} {'JCT mean':>9} {'JCT p99':>9} {'starved':>7} "
        f"{'preempt':>7} {'idle':>5} {'makespan':>9} {'wall':>6} {'us/dec':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        s = r.summary
        per_decision_us = r.schedule_wall_s / max(r.schedule_calls, 1) * 1e6
        lines.append(
            f"{r.policy:<20} {s.short.count:>7} {_fmt(s.short.queueing_delay_s['p50'], 3):>8} "
            f"{_fmt(s.short.queueing_delay_s['p99'], 2):>9} {_fmt(s.short.ttft_s['p99']):>9} "
            f"{_fmt(s.short.throughput_rps):>9} {s.long.count:>5} {_fmt(s.long.jct_mean_s, 1):>9} "
            f"{_fmt(s.long.jct_p99_s, 1):>9} {s.long.starvation_rate:>7.1%} "
            f"{s.preemptions_total:>7} {s.gpu_idle_rate:>5.0%} {_fmt(s.makespan_s, 0):>9} "
            f"{r.wall_s:>6.1f} {per_decision_us:>7.0f}"
        )
    lines.append(
        "qd = short queueing delay (s); JCT = long job completion time (s); starved = long "
        "requests unfinished or > 5x isolated JCT; us/dec = policy cost per schedule call"
    )
    return "\n".join(lines)
