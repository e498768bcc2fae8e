"""Pinned scenarios of past policy deadlocks (found by test_properties.py): each must drain."""

from __future__ import annotations

from builders import make_instance, make_request
from test_properties import Scenario, play

from controlplane.core.types import InstanceSpec, RequestSpec, RequestState

_CONFIG = {
    "chunk_tokens": 2_000,
    "max_pause_s": 0.0,
    "max_decode_batch": 1,
    "long_aging_s": None,
    "max_sp_degree": 2,
    "max_kv_transfer_attempts": 1,
}


def _instances(*rows: tuple[str, int]) -> tuple[InstanceSpec, ...]:
    """General instances i0, i1, ... from rows (node id, KV capacity in tokens)."""
    return tuple(
        make_instance(f"i{k}", node_id=node_id, kv_capacity_tokens=kv)
        for k, (node_id, kv) in enumerate(rows)
    )


def _arrivals(*rows: tuple[int, int, int, int, int]) -> tuple[tuple[int, RequestSpec], ...]:
    """Arrivals from rows (step, request number, prompt tokens, new tokens, priority): request
    `r<number>` arrives at its step (a step is 1 s)."""
    return tuple(
        (step, make_request(f"r{num:02d}", prompt_tokens=prompt, max_new_tokens=new,
                            priority=priority, arrival_s=float(step)))
        for step, num, prompt, new, priority in rows
    )  # fmt: skip


def _finished(sc: Scenario) -> list[str]:
    dp = play(sc)
    assert dp.policy.num_active_requests() == 0, dp.policy.cluster_view(dp.now_s)
    views = dp.policy.take_completed()
    return sorted(v.request_id for v in views if v.state is RequestState.FINISHED)


def test_distserve_prompt_no_single_prefill_instance_holds_runs_on_an_sp_group() -> None:
    # Arrange: i1 (120K) decodes, i0 (30K) and i2 (60K) prefill. The 60001-token prompt fits
    # the decode instance but no single prefill instance: it once waited for one forever,
    # blocking the queue behind it.
    instances = _instances(("n0", 30_000), ("n0", 120_000), ("n1", 60_000))
    arrivals = _arrivals((0, 0, 60_001, 1, 0), (1, 1, 100, 5, 0))
    sc = Scenario("distserve", instances, _CONFIG, arrivals, (), 0.0)

    # Execute / Assert
    assert _finished(sc) == ["r00", "r01"]


def test_sarathi_sp_holds_only_instances_that_can_complete_the_group() -> None:
    # Arrange: r00 (100K) can only run on i2 (120K). r01 needs SP (130K > 120K) within
    # max_sp_degree 2, so i2 must be in its group; the two 30K instances drain first and once
    # filled the cap as holds that could never hold it.
    instances = _instances(("n0", 30_000), ("n0", 30_000), ("n1", 120_000))
    arrivals = _arrivals((0, 0, 100_000, 5, 0), (0, 1, 130_000, 5, 0))
    sc = Scenario("sarathi", instances, _CONFIG, arrivals, (), 0.0)

    # Execute / Assert
    assert _finished(sc) == ["r00", "r01"]


def test_sarathi_sp_holds_never_keep_a_request_with_precedence_waiting() -> None:
    # Arrange: r17 (SP: 110K over both 60K instances) holds both; r09 (priority 2) then
    # arrives and goes first, but could run nowhere while r17 was never tried again. Two SP
    # longs of different priorities once each held half of what both need the same way.
    instances = _instances(("n0", 60_000), ("n0", 60_000))
    config = {
        "chunk_tokens": 8192,
        "max_pause_s": 30.0,
        "max_decode_batch": 3,
        "long_aging_s": None,
        "max_sp_degree": 2,
        "max_kv_transfer_attempts": 3,
    }
    arrivals = _arrivals(
        (0, 15, 10_100, 26, 0),
        (3, 1, 5_177, 26, 0),
        (4, 13, 12_265, 12, 2),
        (10, 3, 3_837, 29, 2),
        (10, 14, 1_369, 22, 2),
        (10, 16, 1_793, 22, 0),
        (13, 17, 110_181, 3, 0),
        (35, 9, 383, 4, 2),
    )
    sc = Scenario("sarathi", instances, config, arrivals, ((9, "fatal", 12),), 0.0)

    # Execute / Assert
    assert {"r09", "r17"} <= set(_finished(sc))
