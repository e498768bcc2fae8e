"""One generated sentence per missed target: by how much and why, from the worst seed's own
numbers (the run's `diagnosis`, `bench/paper_eval_diag.py`, and its metrics).

* Short queueing delay targets: how the slowest 1% of PecSched's shorts were placed (counts by
  path) and where their wait went: before the policy placed them, and from that decision to
  their first prefill execution (for a preempting short, the victim's chunk in flight).
* Long JCT: PecSched's mean long JCT against FIFO's, split into queued, paused and running
  time, the part that grew most, preemptions per long and both policies' starvation.
* TBT and SLO attainment: the TTFT and TBT p99 behind them.
"""

from __future__ import annotations

import math
from typing import Any

from paper_eval_report import (
    JCT,
    NEW_BASELINES,
    PAPER_BASELINES,
    QD99,
    SLO,
    TBT99,
    Point,
    get,
)

# target order of paper_eval_report.targets
QD_PAPER, QD_NEW, TBT, SLO_TARGET, JCT_TARGET = range(5)


def explain(point: Point, target: int) -> str:
    """The sentence on PecSched missing `target` (an index of `targets`) at `point`."""
    if target in (QD_PAPER, QD_NEW):
        names = PAPER_BASELINES if target == QD_PAPER else NEW_BASELINES
        return _queueing(point, names)
    if target == JCT_TARGET:
        return _long_jct(point)
    seed = max(point.seeds, key=lambda s: get(point.results["pecsched"][s], TBT99))
    pec = point.results["pecsched"][seed]
    text = (
        f"seed {seed}: TTFT p99 {get(pec, 'short.ttft_s.p99'):.2f} s, TBT p50 / p99 "
        f"{get(pec, 'short.tbt_s.p50'):.3f} / {get(pec, TBT99):.3f} s"
    )
    if target == SLO_TARGET:
        text += f", SLO attainment {get(pec, SLO):.1%}"
    return text + "."


def _best(point: Point, names: tuple[str, ...], seed: int) -> tuple[str, float] | None:
    feasible = point.baselines(names, seed, True)
    if not feasible:
        return None
    best = min(feasible, key=lambda v: get(point.results[v][seed], QD99))
    return best, get(point.results[best][seed], QD99)


def _queueing(point: Point, names: tuple[str, ...]) -> str:
    def gap(seed: int) -> float:
        best = _best(point, names, seed)
        mine = get(point.results["pecsched"][seed], QD99)
        return -math.inf if best is None else mine - best[1]

    seed = max(point.seeds, key=gap)
    pec = point.results["pecsched"][seed]
    best = _best(point, names, seed)
    head = f"seed {seed}: short p99 queueing {get(pec, QD99):.3f} s"
    if best is not None:
        head += f" vs {best[0]} {best[1]:.3f} s ({get(pec, QD99) - best[1]:+.3f} s)"
    return head + "; " + _tail(pec)


def _tail(result: dict[str, Any]) -> str:
    tail = result.get("diagnosis", {}).get("short_tail")
    if not tail:
        return "no decision log for this run (no breakdown)."
    paths = ", ".join(f"{n} {path}" for path, n in tail["paths"].items())
    return (
        f"its slowest {tail['count']} shorts (≥ {tail['threshold_s']:.3f} s): {paths}; they "
        f"waited {tail['decision_wait_s_mean']:.3f} s on average to be placed and "
        f"{tail['start_wait_s_mean']:.3f} s more for their first chunk to run (a preempting "
        "short waits for the victim's chunk in flight)."
    )


_PARTS = (("queued", "queued_s_mean"), ("paused", "paused_s_mean"), ("running", "running_s_mean"))


def _long_jct(point: Point) -> str:
    seed = max(point.seeds, key=lambda s: point.jct_ratio("pecsched", s))
    pec, fifo = point.results["pecsched"][seed], point.results["fifo"][seed]
    text = (
        f"seed {seed}: long JCT {get(pec, JCT):.1f} s vs FIFO's {get(fifo, JCT):.1f} s "
        f"({point.jct_ratio('pecsched', seed):.3f}x)"
    )
    mine = pec.get("diagnosis", {}).get("long")
    ref = fifo.get("diagnosis", {}).get("long")
    if mine and ref:
        split = " + ".join(f"{name} {mine[key]:.1f}" for name, key in _PARTS)
        ref_split = " + ".join(f"{name} {ref[key]:.1f}" for name, key in _PARTS)
        grew = max(_PARTS, key=lambda part: mine[part[1]] - ref[part[1]])
        text += (
            f"; per finished long, PecSched {split} s, FIFO {ref_split} s: mostly more time "
            f"{grew[0]} (+{mine[grew[1]] - ref[grew[1]]:.1f} s); "
            f"{mine['preemptions_mean']:.1f} preemptions per long"
        )
    return text + (
        f"; starved longs: PecSched {get(pec, 'long.starvation_rate'):.1%}, FIFO "
        f"{get(fifo, 'long.starvation_rate'):.1%}."
    )
