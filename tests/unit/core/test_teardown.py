"""Cancellation, deadlines, failures and instance loss free everything they should."""

from __future__ import annotations

import pytest
from builders import arrive, make_instance, make_instances, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.errors import CoreError, ErrorCode
from controlplane.core.events import (
    InstanceDown,
    InstanceUp,
    RequestCancelled,
    RequestFailed,
    TokensGenerated,
)
from controlplane.core.policy import Policy
from controlplane.core.types import InstanceRole, RequestState

S = RequestState


def kv_used(policy: Policy) -> int:
    return sum(i.kv_used_tokens for i in policy.cluster_view(0.0).instances)


@pytest.mark.parametrize(
    ("steps", "expected_state"),
    [(0, S.QUEUED), (1, S.PREFILLING), (2, S.TRANSFERRING_KV), (4, S.DECODING)],
)
def test_cancel_frees_everything_in_every_state(steps: int, expected_state: S) -> None:
    # Prepare: a short request on pecsched (prefill on g, decode on d)
    instances = [make_instance("g0"), make_instance("d0", role=InstanceRole.SHORT_DECODE)]
    policy = make_policy("pecsched", instances=instances)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("r", prompt_tokens=100, max_new_tokens=50))
    if steps == 0:
        policy.observe(dp.pending)
        dp.pending = []
    for _ in range(steps):
        dp.step()
    assert policy.request_view("r").state is expected_state

    # Execute
    policy.observe([RequestCancelled("r", dp.now_s)])
    decision = policy.schedule(dp.now_s)

    # Assert
    (cancel,) = decision.actions
    assert isinstance(cancel, act.Cancel) and cancel.request_id == "r"
    assert (cancel.instance_ids == ()) is (expected_state is S.QUEUED)
    assert policy.request_view("r").state is S.CANCELLED
    assert kv_used(policy) == 0
    assert all(i.prefill_request_id is None for i in policy.cluster_view(0.0).instances)
    assert policy.num_active_requests() == 0
    # late reports about it are ignored
    policy.observe([TokensGenerated("r", 1, dp.now_s)])
    assert [v.request_id for v in policy.take_completed()] == ["r"]
    with pytest.raises(CoreError) as info:
        policy.request_view("r")
    assert info.value.code is ErrorCode.UNKNOWN_REQUEST


def test_cancel_paused_long_frees_its_group() -> None:
    # Prepare
    policy = make_policy(
        "pecsched",
        instances=make_instances(2, kv_capacity_tokens=100_000),
        short_preempt_delay_s=0.0,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=2))
    dp.step()
    dp.submit(make_request("s", prompt_tokens=100, max_new_tokens=2, arrival_s=dp.now_s))
    dp.step()
    assert policy.request_view("long").state is S.PAUSED

    # Execute
    dp.inject(RequestCancelled("long", dp.now_s))
    decision = dp.step()

    # Assert
    (cancel,) = [a for a in decision.actions if isinstance(a, act.Cancel)]
    assert set(cancel.instance_ids) == {"i00", "i01"}
    while policy.num_active_requests():
        dp.step()
    assert kv_used(policy) == 0


def test_instance_down_requeues_its_requests_and_they_finish_elsewhere() -> None:
    # Prepare: a long SP prefill over i00+i01, a short decoding on i02
    policy = make_policy("fifo", instances=make_instances(3, kv_capacity_tokens=100_000))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=2))
    dp.step()
    (member, other) = policy.request_view("long").prefill_instance_ids

    # Execute: one SP member dies
    dp.inject(InstanceDown(member, dp.now_s))
    decision = dp.step()

    # Assert: the survivor drops its KV; the request starts over on the two live instances
    cancel, restart = decision.actions
    assert isinstance(cancel, act.Cancel) and cancel.instance_ids == (other,)
    assert isinstance(restart, act.StartPrefill) and member not in restart.instance_ids
    assert restart.first_chunk_index == 0
    assert policy.request_view("long").num_requeues == 1
    while policy.num_active_requests():
        dp.step()
        check_invariants(policy, dp.now_s)
        assert dp.now_s < 100
    (done,) = policy.take_completed()
    assert done.state is S.FINISHED and member not in done.prefill_instance_ids


def test_retryable_failure_requeues_and_fatal_failure_fails() -> None:
    policy = make_policy("fifo", instances=make_instances(1))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("a"))
    dp.submit(make_request("b"))
    dp.step()
    dp.inject(RequestFailed("a", True, dp.now_s, "oom"))
    dp.step()
    assert policy.request_view("a").num_requeues == 1
    dp.inject(RequestFailed("b", False, dp.now_s, "bad prompt"))
    dp.step()
    assert policy.request_view("b").state is S.FAILED
    assert policy.request_view("b").error == "bad prompt"


def test_deadline_fails_the_request_and_cancels_its_work() -> None:
    policy = make_policy("fifo", instances=make_instances(1), max_decode_batch=1)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("slow", max_new_tokens=100))
    dp.submit(make_request("late", deadline_s=3.0))
    for _ in range(5):
        dp.step()
    late = policy.request_view("late")
    assert late.state is S.FAILED and late.error == "deadline exceeded"
    assert any("Cancel(request_id='late'" in line for line in dp.log)


def test_never_fits_is_rejected_at_admission_with_a_reason() -> None:
    # Prepare
    policy = make_policy("pecsched", instances=make_instances(2, kv_capacity_tokens=100_000))
    arrive(policy, make_request("huge", prompt_tokens=300_000), make_request("ok"))

    # Execute
    decision = policy.schedule(0.0)

    # Assert
    reject = decision.actions[0]
    assert isinstance(reject, act.Reject) and reject.request_id == "huge"
    assert "300010" in reject.reason and "200000" in reject.reason
    assert policy.request_view("huge").state is S.FAILED
    assert any(isinstance(a, act.StartPrefill) for a in decision.actions[1:])


def test_queued_request_is_rejected_when_the_cluster_shrinks_below_it() -> None:
    policy = make_policy("fifo", instances=make_instances(2, kv_capacity_tokens=100_000))
    arrive(policy, make_request("big", prompt_tokens=150_000))
    policy.observe([InstanceDown("i00", 0.0)])  # before it started
    decision = policy.schedule(0.0)
    assert [type(a) for a in decision.actions] == [act.Reject]


def test_duplicate_ids_are_domain_errors() -> None:
    policy = make_policy("fifo", instances=make_instances(1))
    arrive(policy, make_request("r"))
    with pytest.raises(CoreError) as info:
        arrive(policy, make_request("r"))
    assert info.value.code is ErrorCode.DUPLICATE_REQUEST
    with pytest.raises(CoreError) as info:
        policy.observe([InstanceUp(make_instance("i00"), 0.0)])
    assert info.value.code is ErrorCode.DUPLICATE_INSTANCE
    with pytest.raises(CoreError) as info:
        policy.observe([InstanceDown("nope", 0.0)])
    assert info.value.code is ErrorCode.UNKNOWN_INSTANCE
