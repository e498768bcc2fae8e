"""PecSched's capacity rules: the short-decode pool sized by demand and the TBT target (never
lent below it, only its slack lent to longs), SP groups widened over idle instances, the victim
nearest a chunk boundary, the preemption delay and the anti-thrash bound."""

from __future__ import annotations

from typing import Any

from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.decode_slo import DecodeBatchEstimator
from controlplane.core.events import PrefillChunkDone, RequestArrived
from controlplane.core.policy import Policy
from controlplane.core.types import InstanceRole, RequestState

SD = InstanceRole.SHORT_DECODE


def num_decoders(policy: Policy, now_s: float) -> int:
    return sum(i.role is SD for i in policy.cluster_view(now_s).instances)


def _second_long_and_a_short(**config: Any) -> tuple[Policy, FakeDataPlane]:
    """g0 and d0; long1 prefills on g0, long2 arrives a step later, a short two steps after
    that, and four more steps run."""
    instances = [make_instance("g0"), make_instance("d0", role=SD)]
    policy = make_policy("pecsched", instances=instances, chunk_tokens=10_000, **config)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("long1", prompt_tokens=50_000, max_new_tokens=2))
    dp.step()
    dp.submit(make_request("long2", prompt_tokens=50_000, max_new_tokens=2, arrival_s=dp.now_s))
    for _ in range(2):
        dp.step()
        check_invariants(policy, dp.now_s)
    dp.submit(make_request("short", prompt_tokens=100, max_new_tokens=3, arrival_s=dp.now_s))
    for _ in range(4):
        dp.step()
        check_invariants(policy, dp.now_s)
    return policy, dp


def test_a_waiting_long_gets_only_the_decoders_slack_never_its_role() -> None:
    # Execute
    lent, lent_dp = _second_long_and_a_short()
    kept, kept_dp = _second_long_and_a_short(lend_decoder_to_longs=False)

    # Assert: d0 stays a decoder either way and the short decodes there; with lending long2
    # prefills inside d0's iterations (a small budget a step) and is never paused
    for policy, dp in ((lent, lent_dp), (kept, kept_dp)):
        assert num_decoders(policy, dp.now_s) == 1
        assert policy.request_view("short").decode_instance_ids == ("d0",)
    (coloc,) = [line for line in lent_dp.log if "Colocate(request_id='long2'" in line]
    assert "host_instance_id='d0'" in coloc and "iteration_prefill_budget_tokens=320" in coloc
    assert lent.request_view("long2").num_preemptions == 0
    assert kept.request_view("long2").state is RequestState.QUEUED


def _decoders_for_burst(**config: Any) -> tuple[int, int]:
    """8 general + 1 short-decode instance, batches of 2; 6 shorts arrive at once, a step
    apart from the previous 6 (so the TBT of the first ones is learned). Returns the most
    decoders seen and the decoders left once idle."""
    instances = [make_instance(f"g{k}") for k in range(8)] + [make_instance("d0", role=SD)]
    policy = make_policy("pecsched", instances=instances, max_decode_batch=2, **config)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    most = 0
    for wave in range(2):
        for k in range(6):
            name = f"s{wave}{k}"
            dp.submit(make_request(name, prompt_tokens=100, max_new_tokens=5, arrival_s=dp.now_s))
        for _ in range(8):
            dp.step()
            check_invariants(policy, dp.now_s)
            most = max(most, num_decoders(policy, dp.now_s))
    for _ in range(5):
        dp.step()
    assert policy.num_active_requests() == 0
    return most, num_decoders(policy, dp.now_s)


def test_short_decode_pool_follows_demand_and_the_tbt_target() -> None:
    # Execute: TBT is 1 s a token here; a target it meets at batch 2, one it misses at 2
    loose_most, loose_idle = _decoders_for_burst(short_tbt_slo_s=10.0)
    tight_most, tight_idle = _decoders_for_burst(short_tbt_slo_s=0.9)

    # Assert: 6 shorts at 2 a decoder need 3; at 1 a decoder (TBT 1 s > 0.9 s at batch 2)
    # they need 6. Idle, one decoder stays.
    assert loose_most == 3
    assert tight_most == 6
    assert loose_idle == tight_idle == 1


def test_decode_batch_estimator_keeps_tbt_within_the_target() -> None:
    # Prepare
    estimator = DecodeBatchEstimator(tbt_slo_s=0.1, max_batch=256)
    assert estimator.batch_limit() == 256  # nothing observed yet

    # Execute: 101 tokens over 1 s in a batch of 4 then 6 (mean 5): 0.01 s a token
    estimator.decode_started("a", 0.0, 4)
    estimator.decode_ended("a", 1.0, 101, 6)
    estimator.decode_ended("never-started", 1.0, 101, 6)

    # Assert: 0.002 s per member -> 50 members within 0.1 s
    assert estimator.batch_limit() == 50


def test_long_prefill_widens_over_idle_instances_leaving_one_for_shorts() -> None:
    # Prepare: six idle general instances, a long that fits two
    spec = make_request("long", prompt_tokens=150_000, max_new_tokens=10)

    # Execute
    degrees = []
    for widen in (True, False):
        instances = [make_instance(f"g{k}", kv_capacity_tokens=100_000) for k in range(6)]
        policy = make_policy("pecsched", instances=instances, widen_sp_when_idle=widen)
        dp = FakeDataPlane(policy)
        dp.submit(spec)
        (start,) = dp.step().actions
        assert isinstance(start, act.StartPrefill)
        degrees.append(start.sp_degree)

    # Assert: five of six (one left open for shorts); two without widening
    assert degrees == [5, 2]


def test_two_queued_longs_share_the_idle_instances() -> None:
    # Prepare: seven idle general instances, two longs that fit one each
    instances = [make_instance(f"g{k}", kv_capacity_tokens=100_000) for k in range(7)]
    policy = make_policy("pecsched", instances=instances)
    dp = FakeDataPlane(policy)
    dp.submit(make_request("a", prompt_tokens=50_000, max_new_tokens=2))
    dp.submit(make_request("b", prompt_tokens=50_000, max_new_tokens=2))

    # Execute
    starts = [a for a in dp.step().actions if isinstance(a, act.StartPrefill)]

    # Assert: a takes (7 - 1) // 2 = 3, b then (4 - 1) // 1 = 3; one stays open
    assert [(s.request_id, s.sp_degree) for s in starts] == [("a", 3), ("b", 3)]


def _victim(chunk_done_s: dict[str, tuple[float, float]]) -> str:
    """Longs a (on g0) and b (on g1) prefill; their last two chunk ends are given; a short
    arrives at 2.6 s. Returns the long paused for it."""
    instances = [make_instance("g0"), make_instance("g1"), make_instance("d0", role=SD)]
    policy = make_policy(
        "pecsched",
        instances=instances,
        chunk_tokens=10_000,
        short_decode_colocation=False,
        short_preempt_delay_s=0.0,
    )
    for name in ("a", "b"):
        policy.observe([RequestArrived(make_request(name, prompt_tokens=100_000), 0.0)])
        policy.schedule(0.0)
    events = [
        PrefillChunkDone(name, index, at_s)
        for name, times in chunk_done_s.items()
        for index, at_s in enumerate(times)
    ]
    policy.observe(sorted(events, key=lambda e: e.at_s))
    policy.observe([RequestArrived(make_request("s", arrival_s=2.6), 2.6)])
    (pause,) = [a for a in policy.schedule(2.6).actions if isinstance(a, act.Pause)]
    return pause.request_id


def test_short_preempts_the_long_whose_chunk_ends_first() -> None:
    # Execute / Assert: a's chunk in flight ends at 3.0 s, b's at 3.5 s; then the reverse
    assert _victim({"a": (1.0, 2.0), "b": (1.5, 2.5)}) == "a"
    assert _victim({"a": (1.5, 2.5), "b": (1.0, 2.0)}) == "b"


def _preemptions_under_short_stream(bound: int | None) -> int:
    """One instance, a long prefill of 16 chunks, a short every other step: its pauses."""
    policy = make_policy(
        "pecsched-no-disagg",
        instances=[make_instance("g0")],
        chunk_tokens=5_000,
        chunk_budget_token_pairs=None,
        max_pause_s=1e6,
        max_preemptions_per_long=bound,
        short_preempt_delay_s=0.0,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=80_000, max_new_tokens=2))
    dp.step()
    for k in range(80):
        if k % 2 == 0:
            spec = make_request(f"s{k}", prompt_tokens=500, max_new_tokens=2, arrival_s=dp.now_s)
            dp.submit(spec)
        dp.step()
        check_invariants(policy, dp.now_s)
    view = policy.request_view("long")
    assert view.state is RequestState.FINISHED
    return view.num_preemptions


def test_preemptions_per_long_are_bounded() -> None:
    # Execute
    unbounded = _preemptions_under_short_stream(None)
    bounded = _preemptions_under_short_stream(1)

    # Assert: one pause, then at most one per protected duty cycle (4 chunks) of the 16
    assert 1 <= bounded <= 1 + 16 // 4 < unbounded


def _short_while_a_long_waits(**config: Any) -> tuple[Policy, FakeDataPlane, act.Decision]:
    """g0 prefills long1, long2 waits, d0 decodes nothing; a short arrives. Returns the
    policy, the data plane and the decision taken for the short."""
    instances = [make_instance("g0"), make_instance("d0", role=SD)]
    policy = make_policy(
        "pecsched",
        instances=instances,
        chunk_tokens=10_000,
        short_preempt_delay_s=0.0,
        lend_decoder_to_longs=False,
        **config,
    )
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("long1", prompt_tokens=50_000, max_new_tokens=2))
    dp.submit(make_request("long2", prompt_tokens=50_000, max_new_tokens=2))
    dp.step()
    dp.submit(make_request("short", prompt_tokens=1_000, max_new_tokens=3, arrival_s=dp.now_s))
    return policy, dp, dp.step()


def test_short_prefill_colocates_on_a_decoder_before_preempting_a_long() -> None:
    # Execute
    policy, dp, decision = _short_while_a_long_waits()
    _, _, without = _short_while_a_long_waits(short_decode_colocation=False)
    for _ in range(5):
        dp.step()
        check_invariants(policy, dp.now_s)

    # Assert: colocated on d0 and decoded there (no transfer, no pause); without it, a pause
    (coloc,) = decision.actions
    assert isinstance(coloc, act.Colocate) and coloc.host_instance_id == "d0"
    assert coloc.decode_in_place
    assert policy.request_view("short").decode_instance_ids == ("d0",)
    assert not actions_of_kind(dp, act.TransferKV) and not actions_of_kind(dp, act.Pause)
    assert [type(a) for a in without.actions] == [act.Pause, act.StartPrefill]


def actions_of_kind(dp: FakeDataPlane, kind: type) -> list[str]:
    return [line for line in dp.log if f" {kind.__name__}(" in line]


def test_a_short_preempts_only_after_its_preemption_delay() -> None:
    # Prepare: g0 prefills a long; the decoder takes no colocated prefill
    instances = [make_instance("g0"), make_instance("d0", role=SD)]
    policy = make_policy(
        "pecsched",
        instances=instances,
        chunk_tokens=10_000,
        short_decode_colocation=False,
        short_preempt_delay_s=2.0,
        short_preempt_early=False,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=100_000, max_new_tokens=2))
    dp.step()
    arrival_s = dp.now_s
    dp.submit(make_request("short", prompt_tokens=100, max_new_tokens=2, arrival_s=arrival_s))

    # Execute
    paused_at = []
    for _ in range(4):
        now_s = dp.now_s
        if any(isinstance(a, act.Pause) for a in dp.step().actions):
            paused_at.append(now_s - arrival_s)

    # Assert: the long is paused once, when the short has waited 2 s
    assert paused_at == [2.0]


def burst_setup(delay_s: float) -> FakeDataPlane:
    """One general instance prefills a long (a chunk a step), the other a 3-chunk short ("a");
    the decoder takes no colocated prefill; shorts' preemption delay `delay_s`."""
    instances = [make_instance("g0"), make_instance("g1"), make_instance("d0", role=SD)]
    policy = make_policy(
        "pecsched",
        instances=instances,
        chunk_tokens=1_000,
        chunk_budget_token_pairs=None,
        short_decode_colocation=False,
        short_preempt_delay_s=delay_s,
        widen_sp_when_idle=False,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=100_000, max_new_tokens=2))
    dp.step()
    dp.submit(make_request("a", prompt_tokens=3_000, max_new_tokens=2, arrival_s=dp.now_s))
    dp.step()
    return dp


def test_a_lone_short_waits_its_delay_when_no_chunk_ends_before_it() -> None:
    # Prepare: one short queued, one short prefill running; the long's chunks take 1 s
    dp = burst_setup(delay_s=0.5)
    dp.submit(make_request("b", prompt_tokens=100, max_new_tokens=2, arrival_s=dp.now_s))

    # Execute
    decision = dp.step()

    # Assert: nothing paused yet (a may free its instance first)
    assert not any(isinstance(a, act.Pause) for a in decision.actions)


def test_a_lone_short_pauses_a_long_whose_chunk_ends_before_its_delay() -> None:
    # Prepare: as above, but the delay (10 s) outlasts the long's chunk in flight (1 s)
    dp = burst_setup(delay_s=10.0)
    dp.submit(make_request("b", prompt_tokens=100, max_new_tokens=2, arrival_s=dp.now_s))

    # Execute
    decision = dp.step()

    # Assert: paused at once: waiting would only miss that chunk boundary
    pause, start = decision.actions
    assert isinstance(pause, act.Pause) and pause.request_id == "long"
    assert isinstance(start, act.StartPrefill) and start.request_id == "b"


def test_a_burst_of_shorts_preempts_without_waiting_for_the_delay() -> None:
    # Prepare: two shorts queued at once, one short prefill running: waiting places only one
    # (the long's chunk in flight ends after the delay)
    dp = burst_setup(delay_s=0.5)
    for name in ("b", "c"):
        dp.submit(make_request(name, prompt_tokens=100, max_new_tokens=2, arrival_s=dp.now_s))

    # Execute
    decision = dp.step()

    # Assert: the long is paused in the shorts' first decision
    pause, start = decision.actions
    assert isinstance(pause, act.Pause) and pause.request_id == "long"
    assert isinstance(start, act.StartPrefill) and start.request_id == "b"


def test_a_later_higher_priority_aged_long_takes_the_holds_of_the_former_head() -> None:
    # Prepare: two longs run on g0 (short) and g1 (long); `first` ages and holds g0 when it
    # frees; `urgent` (priority 2) then heads the long queue, ages and would hold g1. Each
    # needs both instances: with the holds split, neither could ever start.
    instances = [make_instance(f"g{k}", kv_capacity_tokens=30_000) for k in range(2)]
    policy = make_policy(
        "pecsched-no-disagg", instances=instances, chunk_tokens=1_000, long_aging_s=3.0
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("quick", prompt_tokens=5_000, max_new_tokens=1))
    dp.submit(make_request("slow", prompt_tokens=25_000, max_new_tokens=20))
    arrivals = {1: ("first", 0), 8: ("urgent", 2)}

    # Execute
    for step in range(400):
        if step in arrivals:
            rid, priority = arrivals[step]
            spec = make_request(rid, prompt_tokens=50_000, priority=priority, arrival_s=dp.now_s)
            dp.submit(spec)
        dp.step()
        if policy.num_active_requests() == 0:
            break

    # Assert: every request finished, the urgent long before the first
    done = {v.request_id: v for v in policy.take_completed()}
    assert {rid: v.state for rid, v in done.items()} == dict.fromkeys(
        ("quick", "slow", "first", "urgent"), RequestState.FINISHED
    )
    assert done["urgent"].finished_s < done["first"].finished_s
