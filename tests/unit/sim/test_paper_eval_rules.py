"""The evaluation's rules (bench/paper_eval_report.py) on hand-built results."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from paper_eval_report import Run, group, targets, verdict  # noqa: E402


@dataclass(frozen=True)
class _Job:
    variant: str
    seed: int
    suite: str = "azure"
    model: str = "m"
    load: float = 1.0


def _result(qd99: float, slo: float, jct: float, tbt99: float = 0.05) -> dict[str, Any]:
    return {
        "short": {
            "queueing_delay_s": {"p99": qd99},
            "slo_attainment": slo,
            "tbt_s": {"p99": tbt99},
        },
        "long": {"jct_mean_s": jct, "starvation_rate": 0.0},
    }


def _runs(table: dict[str, list[tuple[float, float, float]]]) -> list[Run]:
    return [
        Run(_Job(variant, seed), _result(*row))
        for variant, rows in table.items()
        for seed, row in enumerate(rows, start=1)
    ]


BASE = {  # variant: (short p99 QD, SLO attainment, long mean JCT) on seeds 1 and 2
    "fifo": [(10.0, 0.5, 100.0), (12.0, 0.5, 100.0)],
    "priority": [(2.0, 0.6, 104.0), (3.0, 0.6, 104.0)],
    "reservation r=4": [(0.0, 0.9, 300.0), (0.0, 0.9, 300.0)],  # best QD, infeasible JCT
    "reservation r=8": [(1.0, 0.7, 108.0), (1.5, 0.7, 109.0)],
}


def test_swept_baseline_is_shown_at_its_best_feasible_size() -> None:
    [point] = group(_runs({**BASE, "pecsched": [(0.05, 0.95, 104.0)] * 2}))

    assert point.chosen["reservation"] == "reservation r=8"  # r=4 breaks 1.10x FIFO's JCT
    assert point.shown() == ["fifo", "reservation r=8", "priority", "pecsched"]
    assert point.contended  # the best paper baseline waits >= 0.5 s on every seed


def test_targets_are_judged_on_the_worst_seed() -> None:
    pec = [(0.05, 0.95, 104.0), (0.09, 0.95, 106.0)]  # seed 2: 94% below 1.5 s, JCT 1.06x
    [point] = group(_runs({**BASE, "pecsched": pec}))

    cut, new, tbt, slo, jct = targets(point)

    assert cut is not None and not cut.met and "94.0%" in cut.text
    assert new is None  # neither sarathi nor distserve ran
    assert tbt is not None and tbt.met
    assert slo is not None and slo.met  # 95% beats every feasible baseline (r=4 is not one)
    assert jct is not None and not jct.met and "1.06x" in jct.text


def test_a_win_must_hold_on_every_seed() -> None:
    pec = [(0.05, 0.95, 90.0), (0.05, 0.65, 101.0)]
    [point] = group(_runs({**BASE, "pecsched": pec}))

    assert verdict(point, "short.queueing_delay_s.p99", False)[0] == "win"
    assert verdict(point, "short.slo_attainment", True)[0] == "tie"  # 0.65 vs 0.7 on seed 2
    assert verdict(point, "long.jct_mean_s", False)[0] == "tie"  # -10% then +1%
