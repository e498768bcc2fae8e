"""The decision-time benchmark's driver (bench/policy_decision.py) keeps its backlog queued.

Speed itself is measured by the benchmark, never here; this checks what the benchmark relies
on: under a steady stream of completions and arrivals every policy keeps working and leaves the
backlog queued, so the benchmark measures decisions over a long queue.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from policy_decision import POLICIES, measure  # noqa: E402


@pytest.mark.parametrize("name", POLICIES)
def test_steady_driver_keeps_the_backlog_queued(name: str) -> None:
    # Execute
    run = measure(name, num_instances=100, num_queued=1_000, num_calls=200)

    # Assert
    assert len(run.latencies_s) == 200
    assert run.min_queued >= 0.8 * 1_000, f"{name}: backlog drained to {run.min_queued}"
