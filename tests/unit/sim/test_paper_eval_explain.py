"""The evaluation's per-run diagnosis (bench/paper_eval_diag.py) and the explanations of missed
targets generated from it (bench/paper_eval_explain.py), on hand-built runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from paper_eval_diag import diagnose  # noqa: E402
from paper_eval_explain import JCT_TARGET, QD_NEW, explain  # noqa: E402
from paper_eval_report import Run, group  # noqa: E402

from sim.metrics import RequestRecords  # noqa: E402


def _records() -> RequestRecords:
    """Request 0 long (arrives 0, starts 1, finishes 20), shorts 1..100 arriving at 1..100,
    each starting 0.01 s later except short 100: placed at 100.2, started at 100.5."""
    n = 101
    arrival = np.arange(n, dtype=float)
    started = arrival + 0.01
    started[0], started[100] = 1.0, 100.5
    finished = started + 1.0
    finished[0] = 20.0
    return RequestRecords(
        is_long=np.arange(n) == 0,
        arrival_s=arrival,
        first_scheduled_s=started,
        first_token_s=started,
        finished_s=finished,
        output_tokens=np.full(n, 5, dtype=np.int64),
        preemptions=np.where(np.arange(n) == 0, 1, 0).astype(np.int64),
        isolated_jct_s=np.ones(n),
    )


def _log() -> tuple[str, ...]:
    start = "{:.6f} StartPrefill(request_id='{}', instance_ids=('i1',), reason='{}')"
    lines = [start.format(1.0, 0, "SP group of 1")]
    lines += [start.format(i + 0.01, i, "open instance i2") for i in range(1, 100)]
    lines += [
        "5.000000 Pause(request_id='0', instance_ids=('i1',), reason='make room')",
        "8.000000 Resume(request_id='0', instance_ids=('i1',), reason='group free again')",
        start.format(100.2, 100, "preempted long request 7 on i1"),
    ]
    return tuple(lines)


def test_diagnosis_splits_the_long_jct_and_names_the_short_tail_path() -> None:
    # Execute
    d = diagnose(_records(), _log())

    # Assert: JCT 20 = queued 1 + paused 3 + running 16; the p99 tail is short 100 alone (the
    # others wait 0.01 s)
    assert d["long"] == {
        "finished": 1,
        "queued_s_mean": 1.0,
        "paused_s_mean": 3.0,
        "running_s_mean": 16.0,
        "preemptions_mean": 1.0,
    }
    tail = d["short_tail"]
    assert tail["paths"] == {"preempted a long prefill": 1}
    assert abs(tail["decision_wait_s_mean"] - 0.2) < 1e-9
    assert abs(tail["start_wait_s_mean"] - 0.3) < 1e-9


def test_diagnosis_without_a_decision_log_has_no_short_tail() -> None:
    assert "short_tail" not in diagnose(_records(), ())


@dataclass(frozen=True)
class _Job:
    variant: str
    seed: int
    suite: str = "azure"
    model: str = "m"
    load: float = 1.0


def _result(qd99: float, jct: float, diagnosis: dict[str, Any]) -> dict[str, Any]:
    return {
        "short": {"queueing_delay_s": {"p99": qd99}, "slo_attainment": 1.0, "tbt_s": {"p99": 0.05}},
        "long": {"jct_mean_s": jct, "starvation_rate": 0.1},
        "diagnosis": diagnosis,
    }


def test_missed_targets_are_explained_from_the_worst_seeds_numbers() -> None:
    # Prepare: pecsched misses sarathi's p99 and FIFO's JCT, worst on seed 2
    long_fifo = {"queued_s_mean": 10.0, "paused_s_mean": 0.0, "running_s_mean": 90.0}
    long_pec = {**long_fifo, "queued_s_mean": 14.0, "paused_s_mean": 1.0, "preemptions_mean": 2}
    tail = {
        "count": 3,
        "threshold_s": 0.3,
        "paths": {"preempted a long prefill": 3},
        "decision_wait_s_mean": 0.1,
        "start_wait_s_mean": 0.25,
    }
    runs = [Run(_Job("fifo", s), _result(10.0, 100.0, {"long": long_fifo})) for s in (1, 2)] + [
        Run(_Job("sarathi", s), _result(0.30, 104.0, {})) for s in (1, 2)
    ]
    runs += [
        Run(_Job("pecsched", 1), _result(0.31, 104.0, {"long": long_pec, "short_tail": tail})),
        Run(_Job("pecsched", 2), _result(0.35, 106.0, {"long": long_pec, "short_tail": tail})),
    ]
    [point] = group(runs)

    # Execute
    qd, jct = explain(point, QD_NEW), explain(point, JCT_TARGET)

    # Assert
    assert qd.startswith("seed 2: short p99 queueing 0.350 s vs sarathi 0.300 s (+0.050 s)")
    assert "3 preempted a long prefill" in qd and "0.250 s more" in qd
    assert jct.startswith("seed 2: long JCT 106.0 s vs FIFO's 100.0 s (1.060x)")
    assert "mostly more time queued (+4.0 s)" in jct
