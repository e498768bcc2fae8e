"""Pinned scenarios of past policy deadlocks (found by test_properties.py): each must drain."""

from __future__ import annotations

from builders import make_instance, make_request
from test_properties import Scenario, play

from controlplane.core.types import InstanceRole, RequestState

_CONFIG = {
    "chunk_tokens": 2_000,
    "max_pause_s": 0.0,
    "max_decode_batch": 1,
    "long_aging_s": None,
    "max_sp_degree": 2,
    "max_kv_transfer_attempts": 1,
}


def _finished(sc: Scenario) -> list[str]:
    dp = play(sc)
    assert dp.policy.num_active_requests() == 0, dp.policy.cluster_view(dp.now_s)
    views = dp.policy.take_completed()
    return sorted(v.request_id for v in views if v.state is RequestState.FINISHED)


def test_distserve_prompt_no_single_prefill_instance_holds_runs_on_an_sp_group() -> None:
    # Arrange: i1 (120K) decodes, i0 (30K) and i2 (60K) prefill. The 60001-token prompt fits
    # the decode instance but no single prefill instance: it once waited for one forever,
    # blocking the queue behind it.
    instances = (
        make_instance("i0", node_id="n0", kv_capacity_tokens=30_000),
        make_instance("i1", node_id="n0", kv_capacity_tokens=120_000),
        make_instance("i2", node_id="n1", kv_capacity_tokens=60_000),
    )
    arrivals = (
        (0, make_request("r00", prompt_tokens=60_001, max_new_tokens=1)),
        (1, make_request("r01", prompt_tokens=100, max_new_tokens=5, arrival_s=1.0)),
    )
    sc = Scenario("distserve", instances, _CONFIG, arrivals, (), 0.0)

    # Execute / Assert
    assert _finished(sc) == ["r00", "r01"]


def test_sarathi_sp_holds_only_instances_that_can_complete_the_group() -> None:
    # Arrange: r00 (100K) can only run on i2 (120K). r01 needs SP (130K > 120K) within
    # max_sp_degree 2, so i2 must be in its group; the two 30K instances drain first and once
    # filled the cap as holds that could never hold it.
    instances = (
        make_instance("i0", node_id="n0", kv_capacity_tokens=30_000),
        make_instance("i1", node_id="n0", kv_capacity_tokens=30_000),
        make_instance("i2", node_id="n1", kv_capacity_tokens=120_000, role=InstanceRole.GENERAL),
    )
    arrivals = (
        (0, make_request("r00", prompt_tokens=100_000, max_new_tokens=5)),
        (0, make_request("r01", prompt_tokens=130_000, max_new_tokens=5)),
    )
    sc = Scenario("sarathi", instances, _CONFIG, arrivals, (), 0.0)

    # Execute / Assert
    assert _finished(sc) == ["r00", "r01"]
