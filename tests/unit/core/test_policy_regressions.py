"""Pinned scenarios of past policy deadlocks (found by test_properties.py): each must drain."""

from __future__ import annotations

from builders import make_instance, make_request
from test_properties import Scenario, play

from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec, RequestState

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


def test_sarathi_sp_holds_never_keep_a_request_with_precedence_waiting() -> None:
    # Arrange: r17 (SP: 110K over both 60K instances) holds both; r09 (priority 2) then
    # arrives and goes first, but could run nowhere while r17 was never tried again. Two SP
    # longs of different priorities once each held half of what both need the same way.
    sc = Scenario(
        policy="sarathi",
        instances=(
            InstanceSpec(
                instance_id="i0",
                node_id="n0",
                role=InstanceRole.GENERAL,
                tp=1,
                kv_capacity_tokens=60000,
            ),
            InstanceSpec(
                instance_id="i1",
                node_id="n0",
                role=InstanceRole.GENERAL,
                tp=1,
                kv_capacity_tokens=60000,
            ),
        ),
        config={
            "chunk_tokens": 8192,
            "max_pause_s": 30.0,
            "max_decode_batch": 3,
            "long_aging_s": None,
            "max_sp_degree": 2,
            "max_kv_transfer_attempts": 3,
        },
        arrivals=(
            (
                0,
                RequestSpec(
                    request_id="r15",
                    tenant="tenant",
                    prompt_tokens=10100,
                    max_new_tokens=26,
                    priority=0,
                    arrival_s=0.0,
                    deadline_s=None,
                ),
            ),
            (
                3,
                RequestSpec(
                    request_id="r01",
                    tenant="tenant",
                    prompt_tokens=5177,
                    max_new_tokens=26,
                    priority=0,
                    arrival_s=3.0,
                    deadline_s=None,
                ),
            ),
            (
                4,
                RequestSpec(
                    request_id="r13",
                    tenant="tenant",
                    prompt_tokens=12265,
                    max_new_tokens=12,
                    priority=2,
                    arrival_s=4.0,
                    deadline_s=None,
                ),
            ),
            (
                10,
                RequestSpec(
                    request_id="r03",
                    tenant="tenant",
                    prompt_tokens=3837,
                    max_new_tokens=29,
                    priority=2,
                    arrival_s=10.0,
                    deadline_s=None,
                ),
            ),
            (
                10,
                RequestSpec(
                    request_id="r14",
                    tenant="tenant",
                    prompt_tokens=1369,
                    max_new_tokens=22,
                    priority=2,
                    arrival_s=10.0,
                    deadline_s=None,
                ),
            ),
            (
                10,
                RequestSpec(
                    request_id="r16",
                    tenant="tenant",
                    prompt_tokens=1793,
                    max_new_tokens=22,
                    priority=0,
                    arrival_s=10.0,
                    deadline_s=None,
                ),
            ),
            (
                13,
                RequestSpec(
                    request_id="r17",
                    tenant="tenant",
                    prompt_tokens=110181,
                    max_new_tokens=3,
                    priority=0,
                    arrival_s=13.0,
                    deadline_s=None,
                ),
            ),
            (
                35,
                RequestSpec(
                    request_id="r09",
                    tenant="tenant",
                    prompt_tokens=383,
                    max_new_tokens=4,
                    priority=2,
                    arrival_s=35.0,
                    deadline_s=None,
                ),
            ),
        ),
        faults=((9, "fatal", 12),),
        transfer_fault_rate=0.0,
    )

    # Execute / Assert
    assert {"r09", "r17"} <= set(_finished(sc))
