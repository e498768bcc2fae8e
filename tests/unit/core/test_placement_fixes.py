"""Placement fixes from live runs and the simulator: no head-of-line blocking among KV
transfers, refusals remembered per instance, bounded chunk work, an elastic pool that
shrinks, and the duty cycle of protected long prefills."""

from __future__ import annotations

from builders import arrive, make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core import actions as act
from controlplane.core.accounting import KvLedger
from controlplane.core.events import (
    InstanceDown,
    PrefillDone,
    RequestFailed,
    RequestFinished,
    TokensGenerated,
)
from controlplane.core.policy import Policy
from controlplane.core.pool import InstancePool
from controlplane.core.records import InstanceRecord, Slot
from controlplane.core.types import InstanceRole, RequestState, RequestView

SD = InstanceRole.SHORT_DECODE


def _transfers(dp: FakeDataPlane, request_id: str) -> list[str]:
    return [
        line for line in dp.log if " TransferKV(" in line and f"request_id='{request_id}'" in line
    ]


def test_a_transfer_that_does_not_fit_does_not_block_one_that_does() -> None:
    # Prepare: d0 (5000 KV tokens) holds a long-decoding short of 3100 tokens
    instances = [
        make_instance("g0"),
        make_instance("g1"),
        make_instance("d0", role=SD, kv_capacity_tokens=5000),
    ]
    policy = make_policy("pecsched", instances=instances, short_decode_elastic=False)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("busy", prompt_tokens=3000, max_new_tokens=100))
    for _ in range(4):
        dp.step()
    assert policy.request_view("busy").decode_instance_ids == ("d0",)

    # Execute: "big" (2000 tokens) cannot fit d0 now; "small" (110) can; big is ahead
    dp.submit(make_request("big", prompt_tokens=1500, max_new_tokens=500, arrival_s=dp.now_s))
    dp.submit(make_request("small", prompt_tokens=100, max_new_tokens=10, arrival_s=dp.now_s))
    for _ in range(3):
        dp.step()
        check_invariants(policy, dp.now_s)

    # Assert: small went to d0 past the waiting big
    assert len(_transfers(dp, "small")) == 1
    assert not _transfers(dp, "big")


def _starts(decision: act.Decision, request_id: str) -> list[tuple[str, ...]]:
    return [
        a.instance_ids
        for a in decision.actions
        if isinstance(a, act.StartPrefill) and a.request_id == request_id
    ]


def test_a_refusing_instance_is_skipped_until_its_free_kv_changes() -> None:
    # Prepare: two equal general instances; the short starts on one of them
    policy = make_policy("pecsched-no-disagg", instances=[make_instance("g0"), make_instance("g1")])
    arrive(policy, make_request("s", prompt_tokens=100))
    ((first,),) = _starts(policy.schedule(0.0), "s")
    other = "g1" if first == "g0" else "g0"

    # Execute: the data plane refuses it (retryable), twice
    policy.observe([RequestFailed("s", True, 0.1, "fragmented")])
    ((second,),) = _starts(policy.schedule(0.1), "s")
    policy.observe([RequestFailed("s", True, 0.2, "fragmented")])
    after_both = policy.schedule(0.2)

    # Assert: the other instance next; with both refusing, it waits for a change or backoff
    assert second == other
    assert not _starts(after_both, "s")
    backoff_s = policy.config.refused_instance_backoff_s
    assert not _starts(policy.schedule(0.2 + backoff_s / 2), "s")
    assert _starts(policy.schedule(0.2 + backoff_s), "s")


def _wait_for_offer(policy: Policy, request_id: str, from_s: float) -> float:
    """Seconds from `from_s` until the policy places `request_id` again (in 0.25 s steps)."""
    now = from_s
    while not _starts(policy.schedule(now), request_id):
        now += 0.25
    return now - from_s


def test_refusals_in_a_row_back_off_doubling_up_to_the_cap_and_reset_on_progress() -> None:
    # Prepare: one instance; back-off 1 s doubling, at most 3 s; the request placed there
    policy = make_policy(
        "fifo",
        instances=[make_instance("g0")],
        refused_instance_backoff_s=1.0,
        refused_instance_backoff_max_s=3.0,
    )
    arrive(policy, make_request("s", prompt_tokens=100, max_new_tokens=4))
    assert _starts(policy.schedule(0.0), "s")
    now, waits = 0.0, []

    # Execute: g0 refuses it 3 times in a row, then it makes progress and is refused again
    for _ in range(3):
        policy.observe([RequestFailed("s", True, now, "fragmented")])
        waits.append(_wait_for_offer(policy, "s", now))
        now += waits[-1]
    policy.observe([PrefillDone("s", now), TokensGenerated("s", 1, now)])
    policy.observe([RequestFailed("s", True, now, "fragmented")])
    after_progress = _wait_for_offer(policy, "s", now)

    # Assert: 1 s, 2 s, then the 3 s cap; 1 s again after a generated token
    assert waits == [1.0, 2.0, 3.0]
    assert after_progress == 1.0


def test_a_refused_request_returns_once_the_instance_frees_kv() -> None:
    # Prepare: one instance; "s" is refused there while "other" holds KV on it
    policy = make_policy("pecsched-no-disagg", instances=[make_instance("g0")])
    arrive(policy, make_request("other", prompt_tokens=100, max_new_tokens=2))
    policy.schedule(0.0)
    policy.observe([PrefillDone("other", 0.5)])
    arrive(policy, make_request("s", prompt_tokens=100, arrival_s=0.5))
    assert _starts(policy.schedule(0.5), "s")
    policy.observe([RequestFailed("s", True, 0.6, "fragmented")])
    assert not _starts(policy.schedule(0.6), "s")

    # Execute: "other" finishes, its KV is freed
    policy.observe([RequestFinished("other", 0.7)])

    # Assert
    assert _starts(policy.schedule(0.7), "s") == [("g0",)]


def test_chunks_of_a_deep_prefill_are_smaller_so_chunk_work_stays_bounded() -> None:
    # Prepare: one instance big enough for a 500K prompt; default config
    instances = [make_instance("g0", kv_capacity_tokens=1_000_000)]
    chunks: dict[str, dict[int, int]] = {}

    # Execute: each policy prefills a 100K and then a 500K prompt
    for name in ("pecsched-no-disagg", "fifo"):
        policy = make_policy(name, instances=instances)
        sizes = chunks.setdefault(name, {})
        for k, prompt in enumerate((100_000, 500_000)):
            arrive(policy, make_request(f"r{k}", prompt_tokens=prompt, arrival_s=float(k)))
            (start,) = policy.schedule(float(k)).actions
            assert isinstance(start, act.StartPrefill)
            sizes[prompt] = start.chunk_tokens
            policy.observe([RequestFinished(f"r{k}", float(k) + 0.5)])

    # Assert: chunk x prompt bounded for the preemptive policy; fixed chunks without preemption
    config = make_policy("pecsched").config
    budget = config.chunk_budget_token_pairs
    assert budget is not None
    expected = {p: max(512, min(8192, budget // p)) for p in (100_000, 500_000)}
    assert chunks["pecsched-no-disagg"] == expected
    assert chunks["fifo"] == {100_000: 8192, 500_000: 8192}
    assert config.prefill_chunk_tokens(10**9, 1) == config.min_chunk_tokens
    assert config.prefill_chunk_tokens(500_000, 2) == 2 * budget // 500_000


def test_decode_pool_offers_the_most_loaded_first_for_packing() -> None:
    # Prepare: three short-decode instances with 0, 300 and 100 KV tokens used
    ledger = KvLedger()
    pool = InstancePool(ledger, max_decode_batch=8)
    for k, used in enumerate((0, 300, 100)):
        spec = make_instance(f"d{k}", role=SD, kv_capacity_tokens=1000)
        ledger.add_instance(spec.instance_id, 1000)
        if used:
            ledger.allocate(f"r{k}", spec.instance_id, used)
        pool.add(InstanceRecord(spec, SD, tiebreak=0.5))

    # Execute
    packed = pool.top(SD, Slot.OPEN, 3, most_loaded=True)
    spread = pool.top(SD, Slot.OPEN, 3)

    # Assert
    assert [i.instance_id for i in packed] == ["d1", "d2", "d0"]
    assert [i.instance_id for i in spread] == ["d0", "d2", "d1"]


def test_a_decoder_turns_general_when_no_general_instance_is_left() -> None:
    # Prepare: g0 (general, prefilling a long) and d0 (short-decode); g0 dies
    instances = [make_instance("g0"), make_instance("d0", role=SD)]
    policy = make_policy("pecsched", instances=instances, chunk_tokens=10_000)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("long", prompt_tokens=50_000, max_new_tokens=2))
    dp.step()
    dp.inject(InstanceDown("g0", dp.now_s))

    # Execute: everything finishes on d0, then a short arrives
    for _ in range(30):
        dp.step()
        check_invariants(policy, dp.now_s)
    dp.submit(make_request("short", prompt_tokens=100, max_new_tokens=2, arrival_s=dp.now_s))
    for _ in range(5):
        dp.step()
    roles = {i.spec.instance_id: i.role for i in policy.cluster_view(dp.now_s).instances}

    # Assert: d0 turned GENERAL (a decoder alone could prefill nothing) and served both
    assert roles == {"d0": InstanceRole.GENERAL}
    assert policy.request_view("short").prefill_instance_ids == ("d0",)
    assert policy.num_active_requests() == 0


def _stream_shorts_past_a_long(duty_cycle_chunks: int | None) -> tuple[RequestView, float]:
    """One instance, a long prefill of 16 chunks, a short arriving every 4 steps: the long's
    final view and the longest wait of a short."""
    policy = make_policy(
        "pecsched-no-disagg",
        instances=[make_instance("g0")],
        chunk_tokens=5_000,
        chunk_budget_token_pairs=None,
        max_pause_s=2.0,
        protected_duty_cycle_chunks=duty_cycle_chunks,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=80_000, max_new_tokens=2))
    dp.step()
    for k in range(24):
        if k % 4 == 0:
            spec = make_request(f"s{k}", prompt_tokens=500, max_new_tokens=2, arrival_s=dp.now_s)
            dp.submit(spec)
        dp.step()
        check_invariants(policy, dp.now_s)
    for _ in range(100):
        if policy.num_active_requests() == 0:
            break
        dp.step()
    views = {v.spec.request_id: v for v in policy.take_completed()}
    waits = [
        v.first_scheduled_s - v.spec.arrival_s
        for v in views.values()
        if v.spec.request_id != "long" and v.first_scheduled_s is not None
    ]
    return views["long"], max(waits)


def test_protected_long_lends_its_group_once_per_duty_cycle() -> None:
    # Execute
    never, never_wait_s = _stream_shorts_past_a_long(None)
    duty, duty_wait_s = _stream_shorts_past_a_long(3)

    # Assert: both longs finish; with the duty cycle a short waits at most ~3 chunks (steps)
    # plus its own step, without it for the rest of the long prefill; the long's extra pause
    # is one step per 3 chunks
    assert never.state is duty.state is RequestState.FINISHED
    assert duty_wait_s <= 3.0 + 1.0 < never_wait_s
    assert duty.num_preemptions > never.num_preemptions
    assert duty.paused_total_s <= 2.0 + 1.0 + 16 / 3 + 1.0


def _long_pauses_under_short_stream(min_chunks: int) -> RequestView:
    policy = make_policy(
        "pecsched-no-disagg",
        instances=[make_instance("g0")],
        chunk_tokens=5_000,
        chunk_budget_token_pairs=None,
        max_pause_s=1e6,
        min_chunks_between_pauses=min_chunks,
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
    return policy.request_view("long")


def test_a_long_runs_its_minimum_chunks_between_pauses() -> None:
    # Execute: a short arrives every other step, so the long would pause at every chance
    free = _long_pauses_under_short_stream(0)
    spaced = _long_pauses_under_short_stream(3)

    # Assert: 16 chunks; with a minimum of 3 chunks per run it pauses at most 16 / 3 times
    assert spaced.state is free.state is RequestState.FINISHED
    assert 1 <= spaced.num_preemptions <= 16 // 3
    assert free.num_preemptions > spaced.num_preemptions
