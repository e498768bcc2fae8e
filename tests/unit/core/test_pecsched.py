"""PecSched semantics: preemption at chunk boundaries, colocation first, starvation bound,
disaggregated short decode, SP sizing, aging."""

from __future__ import annotations

from typing import Any

from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.events import KVTransferDone
from controlplane.core.policy import Policy
from controlplane.core.types import InstanceRole, RequestState

SD = InstanceRole.SHORT_DECODE


def cluster(num_general: int, num_decode: int = 1, kv: int = 100_000) -> list[Any]:
    general = [make_instance(f"g{k}", kv_capacity_tokens=kv) for k in range(num_general)]
    decode = [make_instance(f"d{k}", role=SD, kv_capacity_tokens=kv) for k in range(num_decode)]
    return general + decode


def actions_of(dp: FakeDataPlane, kind: type, request_id: str | None = None) -> list[str]:
    return [
        line
        for line in dp.log
        if f" {kind.__name__}(" in line
        and (request_id is None or f"request_id='{request_id}'" in line)
    ]


def run_until_idle(dp: FakeDataPlane, policy: Policy, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if policy.num_active_requests() == 0:
            return
        dp.step()
        check_invariants(policy, dp.now_s)
    raise AssertionError(f"still active: {policy.cluster_view(dp.now_s)}")


def test_short_pauses_long_sp_prefill_at_chunk_boundary_and_it_resumes_without_loss() -> None:
    # Prepare: a long prompt that needs both general instances (SP degree 2)
    # (no colocation on the decoder: the short must take a general instance)
    policy = make_policy(
        "pecsched",
        instances=cluster(2),
        chunk_tokens=10_000,
        chunk_budget_token_pairs=None,
        short_decode_colocation=False,
        short_preempt_delay_s=0.0,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=5))
    first = dp.step()
    start = first.actions[0]
    assert isinstance(start, act.StartPrefill) and start.instance_ids == ("g0", "g1")
    assert start.num_chunks == 15 and start.decode_in_place
    for _ in range(3):
        dp.step()

    # Execute: a short arrives while chunk 3 is in flight
    dp.submit(make_request("short", prompt_tokens=1000, max_new_tokens=3, arrival_s=dp.now_s))
    decision = dp.step()

    # Assert: pause, and the short takes one of the group's instances in the same decision
    kinds = [type(a) for a in decision.actions]
    assert kinds == [act.Pause, act.StartPrefill]
    pause, short_start = decision.actions
    assert isinstance(pause, act.Pause) and pause.request_id == "long"
    assert isinstance(short_start, act.StartPrefill) and short_start.request_id == "short"
    assert short_start.instance_ids[0] in ("g0", "g1") and not short_start.decode_in_place
    assert policy.request_view("long").state is RequestState.PAUSED
    run_until_idle(dp, policy)
    done = {v.request_id: v for v in policy.take_completed()}
    assert done["long"].state is RequestState.FINISHED and done["long"].num_preemptions == 1
    assert dp.chunks_run["long"] == list(range(15))  # every chunk once, in order
    assert len(actions_of(dp, act.Resume, "long")) == 1
    assert done["short"].decode_instance_ids == ("d0",)  # disaggregated decode


def test_colocation_is_chosen_before_preemption() -> None:
    # Prepare: long A decodes on g0; long B prefills on g1; no open instance left (and no
    # colocation on the decoder)
    policy = make_policy(
        "pecsched", instances=cluster(2), chunk_tokens=10_000, short_decode_colocation=False
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("A", prompt_tokens=20_000, max_new_tokens=400))
    dp.step()
    dp.submit(make_request("B", prompt_tokens=90_000, max_new_tokens=5))
    for _ in range(4):
        dp.step()
    assert policy.request_view("A").state is RequestState.DECODING
    assert policy.request_view("B").state is RequestState.PREFILLING

    # Execute
    dp.submit(make_request("s", prompt_tokens=2000, max_new_tokens=2, arrival_s=dp.now_s))
    decision = dp.step()

    # Assert
    (coloc,) = decision.actions
    assert isinstance(coloc, act.Colocate)
    assert coloc.host_instance_id == policy.request_view("A").decode_instance_ids[0]
    assert coloc.iteration_prefill_budget_tokens == 512
    assert policy.cluster_view(dp.now_s).colocations_total == 1
    run_until_idle(dp, policy)
    assert not actions_of(dp, act.Pause)


def test_no_coloc_ablation_stalls_the_long_decode_instead() -> None:
    # Prepare
    policy = make_policy("pecsched-no-coloc", instances=cluster(2), chunk_tokens=10_000)
    dp = FakeDataPlane(policy)
    dp.submit(make_request("A", prompt_tokens=20_000, max_new_tokens=400))
    dp.step()
    dp.submit(make_request("B", prompt_tokens=90_000, max_new_tokens=5))
    for _ in range(4):
        dp.step()

    # Execute
    dp.submit(make_request("s", prompt_tokens=2000, max_new_tokens=2, arrival_s=dp.now_s))
    decision = dp.step()

    # Assert: a plain prefill on the long decode's instance, no pause, no colocation
    (start,) = decision.actions
    assert isinstance(start, act.StartPrefill)
    assert start.instance_ids == policy.request_view("A").decode_instance_ids
    view = policy.cluster_view(dp.now_s)
    assert view.decode_stalls_total == 1 and view.colocations_total == 0


def test_no_preempt_ablation_makes_the_short_wait() -> None:
    # Prepare
    policy = make_policy(
        "pecsched-no-preempt",
        instances=cluster(2),
        chunk_tokens=10_000,
        short_decode_colocation=False,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=5))
    dp.step()

    # Execute
    dp.submit(make_request("short", prompt_tokens=1000, max_new_tokens=3, arrival_s=dp.now_s))
    decision = dp.step()

    # Assert
    assert decision.is_empty
    run_until_idle(dp, policy)
    short = {v.request_id: v for v in policy.take_completed()}["short"]
    assert short.first_scheduled_s is not None and short.first_scheduled_s >= 15.0


def test_starvation_bound_stops_preemption_and_resumes_the_long_request() -> None:
    # Prepare: one general instance; shorts arrive every step forever
    policy = make_policy(
        "pecsched",
        instances=cluster(1),
        chunk_tokens=5_000,
        max_pause_s=4.0,
        protected_duty_cycle_chunks=None,
        short_decode_colocation=False,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=50_000, max_new_tokens=2))
    dp.step()

    # Execute
    for k in range(40):
        spec = make_request(f"s{k}", prompt_tokens=500, max_new_tokens=2, arrival_s=dp.now_s)
        dp.submit(spec)
        dp.step()
        check_invariants(policy, dp.now_s)

    # Assert: paused at most a bound's worth (+1 step for the short running on its instance)
    long = policy.request_view("long")
    assert long.state in (RequestState.DECODING, RequestState.FINISHED)
    assert long.num_preemptions >= 1
    assert long.paused_total_s <= 4.0 + 1.0
    assert dp.chunks_run["long"] == list(range(10))


def test_short_decode_goes_to_the_least_loaded_decode_instance() -> None:
    # Prepare: d0 already decodes a long-running short; d1 is empty (fixed pool)
    policy = make_policy("pecsched", instances=cluster(2, num_decode=2), short_decode_elastic=False)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("busy", prompt_tokens=3000, max_new_tokens=50))
    for _ in range(3):
        dp.step()
    busy_dst = policy.request_view("busy").decode_instance_ids[0]

    # Execute
    dp.submit(make_request("next", prompt_tokens=100, max_new_tokens=5, arrival_s=dp.now_s))
    for _ in range(3):
        dp.step()

    # Assert
    (transfer,) = actions_of(dp, act.TransferKV, "next")
    other = "d1" if busy_dst == "d0" else "d0"
    assert f"dst_instance_id='{other}'" in transfer


def test_no_disagg_ablation_decodes_where_prefilled() -> None:
    policy = make_policy("pecsched-no-disagg", instances=cluster(2))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("s", prompt_tokens=100, max_new_tokens=5))
    (start,) = dp.step().actions
    assert isinstance(start, act.StartPrefill) and start.decode_in_place
    run_until_idle(dp, policy)
    assert not actions_of(dp, act.TransferKV)


def test_failed_transfers_retry_then_decode_in_place() -> None:
    # Prepare
    policy = make_policy("pecsched", instances=cluster(1), max_kv_transfer_attempts=2)
    dp = FakeDataPlane(policy)
    dp.submit(make_request("s", prompt_tokens=100, max_new_tokens=3))
    dp.step()
    dp.step()  # prefill done -> TransferKV

    # Execute: both attempts fail
    for _ in range(2):
        dp.transfers.clear()
        dp.inject(KVTransferDone("s", "d0", False, dp.now_s, "link down"))
        dp.step()

    # Assert
    assert len(actions_of(dp, act.TransferKV, "s")) == 2
    (decode,) = actions_of(dp, act.StartDecode, "s")
    assert "instance_id='g0'" in decode and "decode where prefilled" in decode
    run_until_idle(dp, policy)


def test_long_gets_smallest_sp_group_or_more_for_a_prefill_target() -> None:
    # Prepare
    # (widening over idle instances off: test_pecsched_capacity.py pins it)
    plain = make_policy("pecsched", instances=cluster(6, num_decode=0), widen_sp_when_idle=False)
    targeted = make_policy(
        "pecsched",
        instances=cluster(6, num_decode=0),
        target_prefill_tokens_per_instance=40_000,
        widen_sp_when_idle=False,
    )
    spec = make_request("long", prompt_tokens=150_000, max_new_tokens=10)

    # Execute
    groups = []
    for policy in (plain, targeted):
        dp = FakeDataPlane(policy)
        dp.submit(spec)
        (start,) = dp.step().actions
        assert isinstance(start, act.StartPrefill)
        groups.append(start.sp_degree)

    # Assert: 150_010 tokens need 2 instances of 100_000; the target asks for ceil(150/40) = 4
    assert groups == [2, 4]


def test_aged_long_goes_before_shorts() -> None:
    # Prepare: one general instance kept busy by a stream of shorts; a long waits (the
    # decoder neither takes the shorts nor is lent to the long)
    policy = make_policy(
        "pecsched",
        instances=cluster(1),
        long_aging_s=5.0,
        preemption=False,
        short_decode_colocation=False,
        lend_decoder_to_longs=False,
    )
    dp = FakeDataPlane(policy)
    starts: list[str] = []

    # Execute
    for k in range(12):
        dp.submit(make_request(f"s{k}", prompt_tokens=500, max_new_tokens=2, arrival_s=dp.now_s))
        if k == 0:
            dp.submit(make_request("long", prompt_tokens=20_000, max_new_tokens=2))
        for action in dp.step().actions:
            if isinstance(action, act.StartPrefill):
                starts.append(action.request_id)

    # Assert: shorts first until the long has waited 5 s, then the long
    assert "long" in starts
    long_start = policy.request_view("long").first_scheduled_s
    assert long_start is not None and 5.0 <= long_start <= 7.0


def test_elastic_short_decode_pool_shrinks_when_idle_and_grows_with_demand() -> None:
    # Prepare: 8 general + 4 short-decode instances, decode batches of 1
    policy = make_policy("pecsched", instances=cluster(8, num_decode=4), max_decode_batch=1)
    dp = FakeDataPlane(policy, tokens_per_step=1)

    def num_decoders() -> int:
        view = policy.cluster_view(dp.now_s)
        return sum(i.role is SD for i in view.instances)

    initial = num_decoders()  # d0..d3 plus g7 (one GPU in eight)
    assert initial == 5

    # Execute / Assert: idle, the pool gives back all but one instance
    for _ in range(5):
        dp.step()
    assert num_decoders() == 1
    # a burst of 8 shorts at one a decoder: the pool grows to 8, then shrinks to 1 again
    for k in range(8):
        dp.submit(make_request(f"s{k}", prompt_tokens=100, max_new_tokens=30))
    sizes = []
    for _ in range(6):
        dp.step()
        check_invariants(policy, dp.now_s)
        sizes.append(num_decoders())
    assert max(sizes) == 8
    run_until_idle(dp, policy)
    assert len(actions_of(dp, act.TransferKV)) == 8
    for _ in range(3):
        dp.step()
    assert num_decoders() == 1


def test_aged_long_holds_instances_as_they_free_up_and_shorts_keep_the_rest() -> None:
    # Prepare: three shorts of 3, 2 and 1 chunks occupy the three general instances
    policy = make_policy(
        "pecsched",
        instances=cluster(3, num_decode=1),
        chunk_tokens=1_000,
        long_aging_s=0.0,
        preemption=False,
        short_decode_colocation=False,
    )
    dp = FakeDataPlane(policy)
    for name, prompt in (("A", 2_500), ("B", 1_500), ("C", 500)):
        dp.submit(make_request(name, prompt_tokens=prompt))
    dp.step()
    host = {n: policy.request_view(n).prefill_instance_ids[0] for n in "ABC"}

    # Execute: the long (aged at once) needs two instances; a short D arrives with it
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=2, arrival_s=1.0))
    dp.submit(make_request("D", prompt_tokens=500, arrival_s=1.0))
    first = dp.step()  # C's instance is free: the long holds it, D may not take it
    second = dp.step()  # B's instance is free too: the long starts on both
    third = dp.step()  # A's instance is free: D starts there

    # Assert
    assert not [a for a in first.actions if isinstance(a, act.StartPrefill)]
    (start,) = [a for a in second.actions if isinstance(a, act.StartPrefill)]
    assert start.request_id == "long" and set(start.instance_ids) == {host["B"], host["C"]}
    (d_start,) = [a for a in third.actions if isinstance(a, act.StartPrefill)]
    assert d_start.request_id == "D" and d_start.instance_ids == (host["A"],)
