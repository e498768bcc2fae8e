"""Baselines behave as defined: FIFO head-of-line blocking, priority without preemption,
reservation routing by length; all batch decodes and mix prefill with decode."""

from __future__ import annotations

from builders import make_instances, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.types import InstanceRole, RequestState


def starts(decision: act.Decision) -> list[str]:
    return [a.request_id for a in decision.actions if isinstance(a, act.StartPrefill)]


def test_fifo_head_of_line_blocks_a_short_behind_a_long_that_does_not_fit() -> None:
    # Prepare: A takes 2 of 3 instances; B needs 2 as well, only 1 is open
    policy = make_policy("fifo", instances=make_instances(3, kv_capacity_tokens=100_000))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("A", prompt_tokens=150_000, max_new_tokens=2))
    assert starts(dp.step()) == ["A"]
    dp.submit(make_request("B", prompt_tokens=150_000, max_new_tokens=2, arrival_s=1.0))

    # Execute
    dp.submit(make_request("s", prompt_tokens=100, max_new_tokens=2, arrival_s=1.0))
    blocked = dp.step()

    # Assert: the open instance stays unused; s waits for B
    assert blocked.is_empty
    assert policy.request_view("s").state is RequestState.QUEUED
    while policy.request_view("B").state is RequestState.QUEUED:
        dp.step()
        assert policy.request_view("s").state is RequestState.QUEUED or (
            policy.request_view("B").state is not RequestState.QUEUED
        )
    b_start = policy.request_view("B").first_scheduled_s
    s_start = policy.request_view("s").first_scheduled_s
    assert b_start is not None and s_start is not None and s_start >= b_start


def test_priority_serves_shorts_first_and_never_preempts() -> None:
    # Prepare: one instance; a long and three shorts queued together
    policy = make_policy("priority", instances=make_instances(1, kv_capacity_tokens=100_000))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=40_000, max_new_tokens=2))
    for k in range(3):
        dp.submit(make_request(f"s{k}", prompt_tokens=100, max_new_tokens=2))

    # Execute
    order: list[str] = starts(dp.step())
    while policy.num_active_requests():
        decision = dp.step()
        order += starts(decision)
        if "long" in order and policy.request_view("long").state is RequestState.PREFILLING:
            dp.submit(make_request(f"late{dp.now_s}", prompt_tokens=100, arrival_s=dp.now_s))
        check_invariants(policy, dp.now_s)
        assert dp.now_s < 200

    # Assert: shorts first, the long only when no short waited, late shorts waited for it
    assert order[:4] == ["s0", "s1", "s2", "long"]
    assert all(name.startswith("late") for name in order[4:])
    assert not [line for line in dp.log if " Pause(" in line]


def test_reservation_routes_by_length_and_reserved_instances_idle_without_longs() -> None:
    # Prepare
    policy = make_policy(
        "reservation",
        instances=make_instances(4, kv_capacity_tokens=100_000),
        num_long_reserved_instances=2,
    )
    roles = {i.spec.instance_id: i.role for i in policy.cluster_view(0.0).instances}
    reserved = {k for k, role in roles.items() if role is InstanceRole.LONG_RESERVED}
    assert len(reserved) == 2 and "i00" not in reserved
    dp = FakeDataPlane(policy)

    # Execute: many shorts, then a long
    for k in range(6):
        dp.submit(make_request(f"s{k}", prompt_tokens=100, max_new_tokens=2))
    first = dp.step()
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=2, arrival_s=1.0))
    second = dp.step()

    # Assert
    short_hosts = {a.instance_ids[0] for a in first.actions if isinstance(a, act.StartPrefill)}
    assert short_hosts and not short_hosts & reserved  # shorts wait rather than use reserve
    (long_start,) = [
        a for a in second.actions if isinstance(a, act.StartPrefill) and a.request_id == "long"
    ]
    assert set(long_start.instance_ids) == reserved


def test_reservation_default_reserve_holds_the_longest_request() -> None:
    policy = make_policy(
        "reservation",
        instances=make_instances(8, kv_capacity_tokens=200_000),
        reservation_sized_for_tokens=500_000,
    )
    roles = [i.role for i in policy.cluster_view(0.0).instances]
    assert roles.count(InstanceRole.LONG_RESERVED) == 3  # 3 x 200K >= 500K


def test_baselines_batch_decodes_and_mix_prefill_with_decode() -> None:
    for name in ("fifo", "priority", "reservation"):
        # Prepare: a single general instance
        policy = make_policy(name, instances=make_instances(1), max_decode_batch=3)
        dp = FakeDataPlane(policy, tokens_per_step=1)
        for k in range(5):
            dp.submit(make_request(f"s{k}", prompt_tokens=100, max_new_tokens=20))

        # Execute
        for _ in range(6):
            dp.step()
            check_invariants(policy, dp.now_s)

        # Assert: three decode together (the batch limit); prefills ran next to decodes
        (inst,) = policy.cluster_view(dp.now_s).instances
        assert inst.num_decoding == 3, name
        states = [policy.request_view(f"s{k}").state for k in range(5)]
        assert states.count(RequestState.DECODING) == 3, name
        assert states.count(RequestState.QUEUED) == 2, name
