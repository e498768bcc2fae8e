"""Pure parts of `pecsched up --demo`: the side-by-side comparison and the queueing-delay plot."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from pecsched.demo import plot_short_queueing_delays
from pecsched.loadgen import ClusterCounters, Measured, ReplayOutcome
from pecsched.replay import records_of
from pecsched.replay_report import ReplayReport, build_report, format_comparison
from sdk.types import RequestState
from sim.workloads import Workload

T0_S = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def _report(policy: str, short_wait_s: float, counters: ClusterCounters) -> ReplayReport:
    """Two shorts (waiting 0 and `short_wait_s`, 11 tokens over 1 s) and one long."""

    def finished(rid: str, is_long: bool, wait_s: float, jct_s: float) -> Measured:
        return Measured(rid, is_long, RequestState.FINISHED, 10, 11, T0_S, T0_S + wait_s,
                        T0_S + wait_s, T0_S + wait_s + 0.1, T0_S + jct_s, 0, "")  # fmt: skip

    outcome = ReplayOutcome(
        requests=(
            finished("a", False, 0.0, 1.1),
            finished("b", False, short_wait_s, short_wait_s + 1.1),
            finished("c", True, 0.0, 4.0),
        ),
        counters=counters,
        num_submit_errors=0,
        first_submit_error="",
        wall_s=10.0,
    )
    workload = Workload(np.zeros(3), np.array([10, 10, 9000]), np.array([11, 11, 11]))
    return build_report(outcome, records_of(outcome), policy, {}, workload)


def test_comparison_shows_both_policies_and_the_change() -> None:
    # Prepare
    fifo = _report("fifo", 2.0, ClusterCounters(True, 4, 1.0, 0, 0, 0, T0_S + 10))
    ours = _report("pecsched", 0.5, ClusterCounters(True, 4, 1.0, 3, 2, 2, T0_S + 10))

    # Execute
    text = format_comparison(("fifo", fifo), ("pecsched", ours))

    # Assert
    rows = {line[:30].strip(): line[30:].split() for line in text.splitlines()[2:]}
    assert text.splitlines()[0].split() == ["fifo", "pecsched", "change"]
    p99_before, p99_after = (2.0 * 0.99, 0.5 * 0.99)  # two samples: 0 and the wait
    assert rows["short queueing delay p99 (s)"] == [
        f"{p99_before:.3f}", f"{p99_after:.3f}", f"{(p99_after - p99_before) / p99_before:+.0%}"
    ]  # fmt: skip
    assert rows["preemptions"] == ["0", "3", "+3"]
    assert rows["KV transfers"] == ["0", "2", "+2"]
    assert rows["long JCT p50 (s)"] == ["4.000", "4.000", "+0%"]
    assert ours.short_queueing_delay_s.tolist() == pytest.approx([0.0, 0.5])


def test_comparison_without_counters_shows_dashes() -> None:
    # Prepare: a client key may not Watch, so neither run has cluster counters
    unknown = ClusterCounters(False, 0, 0.0, 0, 0, 0, T0_S + 10)
    before, after = _report("fifo", 1.0, unknown), _report("pecsched", 1.0, unknown)

    # Execute
    lines = format_comparison(("fifo", before), ("pecsched", after)).splitlines()

    # Assert
    colocations = next(line for line in lines if line.startswith("colocations"))
    assert colocations.split()[1:] == ["-", "-", "-"]
    assert not math.isnan(after.rows[0].queueing_delay_s["p99"])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "delays.png"

    # Execute: zero delays are drawn at the axis floor; an empty run is left out
    plot_short_queueing_delays(
        [("fifo", np.array([0.0, 0.2, 3.0])), ("pecsched", np.array([0.0, 0.01])),
         ("empty", np.array([]))],
        path,
    )  # fmt: skip

    # Assert
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
