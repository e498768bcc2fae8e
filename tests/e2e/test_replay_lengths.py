"""Pure parts of `pecsched replay`: length shaping, clamping, seeded prompts, records, capacity."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from pecsched.loadgen import ClusterCounters, Measured, ReplayOutcome
from pecsched.replay import (
    LengthPlan,
    capacity_limits,
    plan_requests,
    records_of,
    replay_options,
    scale_lengths,
)
from pecsched.replay_report import build_report
from sdk.types import (
    ClusterSnapshot,
    InstanceInfo,
    InstanceRole,
    InstanceState,
    RequestState,
)
from sim.workloads import Workload


def _workload(prompts: list[int], outputs: list[int]) -> Workload:
    n = len(prompts)
    return Workload(
        np.arange(n, dtype=np.float64), np.array(prompts, np.int64), np.array(outputs, np.int64)
    )


def _plan(**kw: object) -> LengthPlan:
    base: dict[str, object] = {
        "token_scale": 1.0,
        "long_threshold_tokens": 4096,
        "long_rescale": None,
        "max_prompt_tokens": None,
        "max_output_tokens": None,
        "max_short_total_tokens": None,
        "max_long_total_tokens": None,
    }
    base.update(kw)
    return LengthPlan(**base)  # type: ignore[arg-type]


def test_token_scale_applies_to_shorts_and_outputs_long_rescale_to_longs() -> None:
    # Prepare
    w = _workload([1000, 4096, 8000, 5000, 2000], [100, 10, 400, 50, 3])

    # Execute
    got = scale_lengths(w, _plan(token_scale=0.1, long_rescale=(2000, 6000)))

    # Assert: shorts x0.1; longs spread by rank (4096 lowest, 8000 highest) over [2000, 6000]
    assert got.prompt_tokens.tolist() == [100, 2000, 6000, 4000, 200]
    assert got.output_tokens.tolist() == [10, 1, 40, 5, 1]
    assert got.arrival_s.tolist() == w.arrival_s.tolist()


def test_clamps_to_the_cluster_capacity_and_flags() -> None:
    # Prepare
    w = _workload([3000, 9000, 500], [900, 5000, 2000])
    plan = _plan(max_output_tokens=1000, max_short_total_tokens=2048, max_long_total_tokens=6144)

    # Execute
    got = scale_lengths(w, plan)

    # Assert
    p, o = got.prompt_tokens, got.output_tokens
    assert o.max() <= 1000
    assert p[0] + o[0] <= 2048 and p[2] + o[2] <= 2048
    assert p[1] + o[1] <= 6144
    assert (p >= 1).all() and (o >= 1).all()


def test_bad_plan_values_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--token-scale"):
        _plan(token_scale=0.0)
    with pytest.raises(ValueError, match="--long-rescale"):
        _plan(long_rescale=(5000, 100))


def test_prompts_are_seeded_and_in_byte_range() -> None:
    w = _workload([5, 300], [2, 3])
    first, again, other = plan_requests(w, 1), plan_requests(w, 1), plan_requests(w, 2)
    assert first == again and first != other
    assert [len(r.prompt_token_ids) for r in first] == [5, 300]
    assert all(1 <= t < 256 for r in first for t in r.prompt_token_ids)
    assert [r.max_new_tokens for r in first] == [2, 3]


def test_capacity_limits_from_a_snapshot() -> None:
    def inst(role: InstanceRole, cap: int, state: InstanceState = InstanceState.UP) -> InstanceInfo:
        return InstanceInfo("n/0", "n", role, state, 1, (0,), cap, 0, ())

    snapshot = ClusterSnapshot(
        at=None,
        policy="pecsched",
        classes=(),
        instances=(
            inst(InstanceRole.GENERAL, 4096),
            inst(InstanceRole.GENERAL, 2048),
            inst(InstanceRole.GENERAL, 9999, InstanceState.DOWN),
            inst(InstanceRole.SHORT_DECODE, 3000),
        ),
        num_preemptions_total=0,
        num_colocations_total=0,
        num_kv_transfers_total=0,
        throughput_rps=0.0,
    )
    assert capacity_limits(snapshot) == (3000, 6144)
    empty = ClusterSnapshot(None, "fifo", (), (), 0, 0, 0, 0.0)
    assert capacity_limits(empty) == (None, None)


def test_report_uses_the_simulator_metrics_and_json_schema() -> None:
    # Prepare: two finished shorts, one long never scheduled.
    t0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()

    def measured(rid: str, long: bool, start: float, first: float, end: float, n: int) -> Measured:
        finished = RequestState.FINISHED if not math.isnan(end) else RequestState.QUEUED
        return Measured(rid, long, finished, 10, n, t0, t0 + start, t0 + first, t0 + first,
                        t0 + end, 1 if long else 0, "")  # fmt: skip

    outcome = ReplayOutcome(
        requests=(
            measured("a", False, 0.1, 0.2, 1.2, 11),
            measured("b", False, 0.3, 0.5, 2.5, 21),
            measured("c", True, math.nan, math.nan, math.nan, 0),
        ),
        counters=ClusterCounters(True, 4, 2.0, 1, 2, 3, t0 + 10.0),
        num_submit_errors=0,
        first_submit_error="",
        wall_s=10.0,
    )

    # Execute
    workload = _workload([10, 20, 9000], [11, 21, 5])
    report = build_report(outcome, records_of(outcome), "pecsched", {"x": 1}, workload)

    # Assert
    result = report.payload["results"][0]
    assert report.payload["config"]["policies"] == ["pecsched"]
    assert result["short"]["count"] == 2 and result["long"]["count"] == 1
    assert result["short"]["queueing_delay_s"]["p50"] == pytest.approx(0.2)
    assert result["short"]["tbt_s"]["p50"] == pytest.approx(0.1)
    assert result["long"]["queueing_delay_s"]["p50"] == pytest.approx(10.0)  # end - arrival
    assert result["long"]["starvation_rate"] == 1.0  # never finished
    assert result["live"]["colocations_total"] == 2 and result["live"]["kv_transfers_total"] == 3
    assert set(result) >= {"policy", "short", "long", "preemptions_total", "gpu_idle_rate"}
    assert report.num_failed == 1
    assert "qd p50" in report.table and "2 colocations" in report.table


def test_report_without_watch_marks_cluster_counters_unavailable() -> None:
    # Prepare: a client key may not Watch, so no counters were sampled.
    t0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    done = Measured("a", False, RequestState.FINISHED, 10, 3, t0, t0 + 0.1, t0 + 0.2, t0 + 0.2,
                    t0 + 0.4, 0, "")  # fmt: skip
    outcome = ReplayOutcome((done,), ClusterCounters(False, 0, 0.0, 0, 0, 0, t0 + 1), 0, "", 1.0)

    # Execute
    report = build_report(outcome, records_of(outcome), "unknown", {}, _workload([10], [3]))

    # Assert
    live = report.payload["results"][0]["live"]
    assert live["colocations_total"] is None and live["kv_transfers_total"] is None
    assert report.payload["results"][0]["gpu_idle_rate"] is None
    assert "counters unavailable" in report.table and report.num_failed == 0


def test_replay_options_are_the_cli_defaults_with_fields_set() -> None:
    # Execute
    options = replay_options(token_scale=0.5, duration=30.0)

    # Assert: the rest as `pecsched replay` parses them; an unknown field is refused
    assert options.token_scale == 0.5 and options.duration == 30.0
    assert options.time_scale == 1.0 and options.long_threshold_tokens == 4096
    assert options.long_rescale is None and options.drain_timeout == 600.0
    with pytest.raises(TypeError, match="tokens_scale"):
        replay_options(tokens_scale=2.0)
