"""The baselines a fair operator would run: sarathi (mixed batches behind a router), distserve
(static prefill/decode split) and reservation sized by the long class's work share."""

from __future__ import annotations

import random

from builders import arrive, make_config, make_instances, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.policies.reservation import work_tokens
from controlplane.core.policies.sarathi import SarathiPolicy
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.types import InstanceRole, RequestState


def _run_to_end(dp: FakeDataPlane, limit_s: float = 500.0) -> list[act.Action]:
    actions = list(dp.step().actions)
    while dp.policy.num_active_requests():
        actions += dp.step().actions
        check_invariants(dp.policy, dp.now_s, dp.specs, dp.mixed)
        assert dp.now_s < limit_s
    return actions


def test_sarathi_mixes_a_short_prefill_into_a_running_long_prefill_and_never_preempts() -> None:
    # Prepare: one instance prefilling a long prompt
    policy = make_policy("sarathi", instances=make_instances(1, kv_capacity_tokens=100_000))
    cfg = policy.config
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=20_000, max_new_tokens=4))
    (long_start,) = dp.step().actions

    # Execute: a short arrives while the long's prefill runs
    dp.submit(make_request("s", prompt_tokens=400, max_new_tokens=4, arrival_s=dp.now_s))
    (short_start,) = dp.step().actions
    rest = _run_to_end(dp)

    # Assert: both share i0's mixed iterations under the budget, the long capped per iteration
    assert isinstance(long_start, act.Colocate) and isinstance(short_start, act.Colocate)
    assert long_start.host_instance_id == short_start.host_instance_id == "i00"
    assert long_start.mixed_batch_tokens == short_start.mixed_batch_tokens == 2048
    assert long_start.chunk_tokens == cfg.sarathi_long_prefill_tokens == 512
    assert short_start.chunk_tokens == cfg.sarathi_batch_tokens
    assert policy.request_view("s").state is RequestState.FINISHED
    assert not any(isinstance(a, act.Pause) for a in rest)
    assert policy.cluster_view(dp.now_s).preemptions_total == 0


def test_sarathi_limits_partial_prefills_and_lets_shorts_pass_a_waiting_long() -> None:
    # Prepare: one instance; two longs then five shorts arrive together
    policy = make_policy("sarathi", instances=make_instances(1, kv_capacity_tokens=200_000))
    specs = [make_request(f"L{k}", prompt_tokens=20_000) for k in range(2)]
    specs += [make_request(f"s{k}", prompt_tokens=500) for k in range(5)]
    arrive(policy, *specs)

    # Execute
    started = [a.request_id for a in policy.schedule(0.0).actions]

    # Assert: 4 partial prefills at most, 1 of them long; L1 waits, s0-s2 pass it, s3 stops
    assert started == ["L0", "s0", "s1", "s2"]
    assert policy.request_view("L1").state is RequestState.QUEUED


def test_sarathi_counts_prefills_in_flight_and_decodes_against_the_sequence_limit() -> None:
    # Prepare: one instance of 3 sequences at most; one request decodes there
    policy = make_policy(
        "sarathi", instances=make_instances(1, kv_capacity_tokens=100_000), max_decode_batch=3
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("d", prompt_tokens=100, max_new_tokens=1_000))
    dp.step()
    while policy.request_view("d").state is not RequestState.DECODING:
        dp.step()

    # Execute: three shorts arrive together
    for k in range(3):
        dp.submit(make_request(f"s{k}", prompt_tokens=500, arrival_s=dp.now_s))
    started = [a.request_id for a in dp.step().actions]

    # Assert: one decode + two prefills fill the 3 places (vLLM max_num_seqs); s2 waits
    assert started == ["s0", "s1"]
    assert policy.request_view("s2").state is RequestState.QUEUED


def test_sarathi_routes_to_the_least_outstanding_prefill_tokens() -> None:
    # Prepare: two instances, a long prefilling on one of them
    policy = make_policy("sarathi", instances=make_instances(2, kv_capacity_tokens=100_000))
    arrive(policy, make_request("long", prompt_tokens=20_000))
    (first,) = policy.schedule(0.0).actions
    assert isinstance(first, act.Colocate)

    # Execute: three shorts
    arrive(policy, *(make_request(f"s{k}", prompt_tokens=1000) for k in range(3)))
    hosts = {
        a.request_id: a.host_instance_id
        for a in policy.schedule(0.0).actions
        if isinstance(a, act.Colocate)
    }

    # Assert: all to the other instance (3,000 outstanding tokens < 20,000)
    other = "i01" if first.host_instance_id == "i00" else "i00"
    assert hosts == {"s0": other, "s1": other, "s2": other}


def test_sarathi_prefills_a_prompt_no_instance_holds_on_an_sp_group() -> None:
    # Prepare
    policy = make_policy("sarathi", instances=make_instances(3, kv_capacity_tokens=100_000))
    dp = FakeDataPlane(policy)
    dp.submit(make_request("big", prompt_tokens=150_000, max_new_tokens=2))

    # Execute
    (start,) = dp.step().actions
    _run_to_end(dp)

    # Assert
    assert isinstance(start, act.StartPrefill) and start.sp_degree == 2 and start.decode_in_place
    assert policy.request_view("big").state is RequestState.FINISHED


def test_distserve_never_decodes_on_a_prefill_instance_and_moves_every_kv() -> None:
    # Prepare: 5 instances, 2 of them decode; shorts and longs that fit one instance
    policy = make_policy(
        "distserve",
        instances=make_instances(5, kv_capacity_tokens=100_000),
        distserve_decode_instances=2,
    )
    roles = {i.spec.instance_id: i.role for i in policy.cluster_view(0.0).instances}
    decoders = {i for i, role in roles.items() if role is InstanceRole.SHORT_DECODE}
    assert len(decoders) == 2
    dp = FakeDataPlane(policy)
    for k in range(6):
        dp.submit(make_request(f"s{k}", prompt_tokens=300, max_new_tokens=8))
    for k in range(2):
        dp.submit(make_request(f"L{k}", prompt_tokens=30_000, max_new_tokens=8))

    # Execute
    actions = _run_to_end(dp)

    # Assert: prefills only on prefill instances, one transfer and one decode start per request
    prefills = [a for a in actions if isinstance(a, act.StartPrefill)]
    transfers = [a for a in actions if isinstance(a, act.TransferKV)]
    decodes = [a for a in actions if isinstance(a, act.StartDecode)]
    assert len(prefills) == len(transfers) == len(decodes) == 8
    assert all(not a.decode_in_place and not decoders & set(a.instance_ids) for a in prefills)
    assert all(a.dst_instance_id in decoders for a in transfers)
    assert all(a.instance_id in decoders for a in decodes)
    assert policy.cluster_view(dp.now_s).kv_transfers_total == 8


def test_distserve_default_split_gives_a_sixteenth_of_the_gpus_to_decode() -> None:
    def decoders(n: int) -> int:
        policy = make_policy("distserve", instances=make_instances(n))
        roles = [i.role for i in policy.cluster_view(0.0).instances]
        return roles.count(InstanceRole.SHORT_DECODE)

    assert [decoders(n) for n in (1, 2, 8, 32, 48)] == [0, 1, 1, 2, 3]


def test_reservation_default_size_follows_the_long_work_share() -> None:
    # Prepare: 10 instances; attention weighed out, so work = prompt + output tokens
    def policy_after(*specs: object) -> int:
        policy = make_policy(
            "reservation",
            instances=make_instances(10, kv_capacity_tokens=200_000),
            reservation_sized_for_tokens=300_000,  # floor: 2 instances
            reservation_attention_tokens=10**15,
        )
        arrive(policy, *specs)  # type: ignore[arg-type]
        policy.schedule(0.0)
        roles = [i.role for i in policy.cluster_view(0.0).instances]
        return roles.count(InstanceRole.LONG_RESERVED)

    shorts = [make_request(f"s{k}", prompt_tokens=3_999, max_new_tokens=1) for k in range(10)]
    long = make_request("L", prompt_tokens=59_999, max_new_tokens=1)

    # Execute / Assert: 60,000 of 100,000 work tokens are long: 6 of 10 instances
    assert policy_after(long, *shorts) == 6
    assert policy_after(*shorts) == 2  # no long work yet: the floor
    assert policy_after(long) == 9  # all long work: all but one


def test_reservation_explicit_size_overrides_the_rule() -> None:
    policy = make_policy("reservation", instances=make_instances(10), num_long_reserved_instances=4)
    arrive(policy, make_request("L", prompt_tokens=50_000))
    policy.schedule(0.0)
    roles = [i.role for i in policy.cluster_view(0.0).instances]
    assert roles.count(InstanceRole.LONG_RESERVED) == 4


def test_work_tokens_counts_linear_and_attention_flops() -> None:
    cfg = make_config()
    assert work_tokens(100, 10, 1000) == 110 + (100 * 100 / 2 + 100 * 10) / 1000
    assert cfg.reservation_attention_tokens == 32_768


def test_baselines_take_the_chunk_budget_only_when_asked() -> None:
    # Prepare
    fixed = make_config(preemption=False)
    budgeted = make_config(preemption=False, chunk_budget_without_preemption=True)
    budget = budgeted.chunk_budget_token_pairs
    assert budget is not None

    # Assert: 8,192-token chunks by default; the budget rule (as for pecsched) when asked
    assert fixed.prefill_chunk_tokens(500_000, 1) == fixed.chunk_tokens == 8192
    assert budgeted.prefill_chunk_tokens(500_000, 1) == budget // 500_000
    assert budgeted.prefill_chunk_tokens(500_000, 1) == make_config().prefill_chunk_tokens(
        500_000, 1
    )


def test_new_baselines_force_their_defining_settings() -> None:
    sarathi = make_policy("sarathi", preemption=True, disaggregation=True).config
    distserve = make_policy("distserve", preemption=True, short_decode_elastic=True).config
    assert not sarathi.preemption and not sarathi.disaggregation
    assert not distserve.preemption and distserve.disaggregation
    assert not distserve.short_decode_elastic  # a static split


def test_sarathi_router_heap_picks_what_a_scan_of_every_instance_picks() -> None:
    # Prepare: 6 instances, a random mix of shorts and longs arriving over time; every routing
    # decision is checked against the exhaustive scan the heap replaces
    rng = random.Random(7)
    policy = make_policy("sarathi", instances=make_instances(6, kv_capacity_tokens=60_000))
    assert isinstance(policy, SarathiPolicy)
    heap_route = policy._route
    checked = 0

    def checked_route(req: RequestRecord, is_long: bool) -> InstanceRecord | None:
        nonlocal checked
        expected = _scan_route(policy, req, is_long)
        got = heap_route(req, is_long)
        assert (got and got.instance_id) == (expected and expected.instance_id)
        checked += 1
        return got

    policy._route = checked_route  # type: ignore[method-assign]
    dp = FakeDataPlane(policy)

    # Execute
    for k in range(120):
        long = rng.random() < 0.15
        prompt = rng.randint(5_000, 20_000) if long else rng.randint(50, 3_000)
        dp.submit(make_request(f"r{k}", prompt_tokens=prompt, max_new_tokens=rng.randint(1, 30)))
        dp.step()
    _run_to_end(dp, limit_s=2_000.0)

    # Assert: every request finished; the heap agreed with the scan every time
    assert checked >= 120
    assert all(v.state is RequestState.FINISHED for v in policy.take_completed())


def _scan_route(policy: SarathiPolicy, req: RequestRecord, is_long: bool) -> InstanceRecord | None:
    """The router by definition: the least (outstanding prompt tokens, decodes, tiebreak)
    instance with a free place of the request's kind, KV room and a decode place."""
    cfg, st = policy.config, policy._state
    best, best_key = None, None
    for inst in st.instances.values():
        load = policy._load.get(inst.instance_id)
        num, num_long, tokens = (
            (0, 0, 0) if load is None else (load.num, load.num_long, load.prompt_tokens)
        )
        if (
            num >= cfg.sarathi_max_partial_prefills
            or (is_long and num_long >= cfg.sarathi_max_long_partial_prefills)
            or inst.prefill_id is not None
            or inst.held_for is not None
            or len(inst.decoding) >= cfg.max_decode_batch
            or not st.ledger.can_allocate(inst.instance_id, req.spec.total_tokens)
        ):
            continue
        key = (tokens, len(inst.decoding), inst.tiebreak)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best
