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
    seed: int = 0  # the run's seed (the policy's tie-breaks; a synthetic workload's draw)


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
        "seed": result.seed,
        "short": {
            "count": s.short.count,
            "queueing_delay_s": _nums(s.short.queueing_delay_s),
            "ttft_s": _nums(s.short.ttft_s),
            "tbt_s": _nums(s.short.tbt_s),
            "throughput_rps": _num(s.short.throughput_rps),
            "throughput_makespan_rps": _num(s.short.throughput_makespan_rps),
            "slo_attainment": _num(s.short.slo_attainment),
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


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def table(results: list[PolicyResult]) -> str:
    """A fixed-width table, one row per result (labelled with its seed when seeds differ)."""
    seeds = len({r.seed for r in results}) > 1
    label = 24 if seeds else 20
    header = (
        f"{'policy':<{label}} {'short':>6} {'qd p50':>7} {'qd p99':>8} {'ttft p99':>8} "
        f"{'tbt p50':>7} {'tbt p99':>7} {'SLO':>6} {'rps mk':>6} {'rps sh':>6} {'long':>5} "
        f"{'JCT mean':>8} {'JCT p99':>8} {'starved':>7} {'preempt':>7} {'idle':>4} "
        f"{'makespan':>8} {'wall':>6} {'us/dec':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        s = r.summary
        per_decision_us = r.schedule_wall_s / max(r.schedule_calls, 1) * 1e6
        name = f"{r.policy} seed={r.seed}" if seeds else r.policy
        lines.append(
            f"{name:<{label}} {s.short.count:>6} {_fmt(s.short.queueing_delay_s['p50'], 3):>7} "
            f"{_fmt(s.short.queueing_delay_s['p99']):>8} {_fmt(s.short.ttft_s['p99']):>8} "
            f"{_fmt(s.short.tbt_s['p50'], 3):>7} {_fmt(s.short.tbt_s['p99'], 3):>7} "
            f"{_pct(s.short.slo_attainment):>6} {_fmt(s.short.throughput_makespan_rps):>6} "
            f"{_fmt(s.short.throughput_rps):>6} {s.long.count:>5} "
            f"{_fmt(s.long.jct_mean_s, 1):>8} {_fmt(s.long.jct_p99_s, 1):>8} "
            f"{s.long.starvation_rate:>7.1%} {s.preemptions_total:>7} {s.gpu_idle_rate:>4.0%} "
            f"{_fmt(s.makespan_s, 0):>8} {r.wall_s:>6.1f} {per_decision_us:>6.0f}"
        )
    lines.append(
        "qd = short queueing delay (s); tbt = per-request mean time between tokens (s); SLO = "
        "shorts within the TTFT and TBT-p99 SLOs; rps mk / sh = short throughput over the "
        "makespan / over the shorts' span; JCT = long job completion time (s); starved = long "
        "requests unfinished or > 5x isolated JCT; us/dec = policy cost per schedule call"
    )
    return "\n".join(lines)
