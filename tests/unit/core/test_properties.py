"""Hypothesis properties over random workloads and faults, for every policy.

A fake data plane (fake_dataplane.py) completes chunks, transfers and decodes; faults are
injected at random steps. Checked after every schedule(): no instance over its KV capacity,
no request in two places, prefill slots consistent. After arrivals stop and every instance is
back up, every admitted request reaches a terminal state. The same seed gives the same log.
"""

from __future__ import annotations

from dataclasses import dataclass

from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.core.events import (
    InstanceDown,
    InstanceUp,
    RequestCancelled,
    RequestFailed,
)
from controlplane.core.policies.registry import policy_names
from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec, RequestState

ARRIVAL_STEPS = 40
DRAIN_STEPS = 3000


@dataclass(frozen=True)
class Scenario:
    policy: str
    instances: tuple[InstanceSpec, ...]
    config: dict[str, object]
    arrivals: tuple[tuple[int, RequestSpec], ...]
    faults: tuple[tuple[int, str, int], ...]  # (step, kind, index)
    transfer_fault_rate: float


@st.composite
def scenarios(draw: st.DrawFn, policy: str | None = None) -> Scenario:
    name = policy or draw(st.sampled_from(policy_names()))
    n = draw(st.integers(1, 6))
    instances = tuple(
        make_instance(
            f"i{k}",
            node_id=f"n{k // 2}",
            kv_capacity_tokens=draw(st.sampled_from([30_000, 60_000, 120_000])),
            role=draw(st.sampled_from(list(InstanceRole))) if k else InstanceRole.GENERAL,
        )
        for k in range(n)
    )
    config = {
        "chunk_tokens": draw(st.sampled_from([2_000, 8_192])),
        "max_pause_s": draw(st.sampled_from([0.0, 3.0, 30.0])),
        "max_decode_batch": draw(st.sampled_from([1, 3, 64])),
        "long_aging_s": draw(st.sampled_from([None, 5.0])),
        "max_sp_degree": draw(st.sampled_from([1, 2, 8])),
        "max_kv_transfer_attempts": draw(st.sampled_from([1, 3])),
    }
    num_requests = draw(st.integers(1, 30))
    arrivals = []
    for k in range(num_requests):
        step = draw(st.integers(0, ARRIVAL_STEPS - 1))
        long = draw(st.booleans())
        prompt = draw(st.integers(4_096, 200_000) if long else st.integers(1, 4_095))
        spec = make_request(
            f"r{k:02d}",
            prompt_tokens=prompt,
            max_new_tokens=draw(st.integers(1, 30)),
            priority=draw(st.integers(0, 2)),
            arrival_s=float(step),
        )
        arrivals.append((step, spec))
    faults = tuple(
        (draw(st.integers(0, ARRIVAL_STEPS - 1)), kind, draw(st.integers(0, 40)))
        for kind in draw(
            st.lists(st.sampled_from(["cancel", "retry", "fatal", "down"]), max_size=6)
        )
    )
    rate = draw(st.sampled_from([0.0, 0.3]))
    arrivals.sort(key=lambda a: (a[0], a[1].request_id))
    return Scenario(name, instances, config, tuple(arrivals), faults, rate)


def play(sc: Scenario, seed: int = 0, check: bool = True) -> FakeDataPlane:
    policy = make_policy(sc.policy, instances=sc.instances, seed=seed, **sc.config)
    dp = FakeDataPlane(policy, fault_rate=sc.transfer_fault_rate)
    down: dict[str, InstanceSpec] = {}
    submitted: list[str] = []
    for step in range(ARRIVAL_STEPS):
        for at, spec in sc.arrivals:
            if at == step:
                dp.submit(spec)
                submitted.append(spec.request_id)
        for at, kind, index in sc.faults:
            if at != step:
                continue
            if kind == "down":
                spec_i = sc.instances[index % len(sc.instances)]
                if spec_i.instance_id in down:
                    dp.inject(InstanceUp(down.pop(spec_i.instance_id), dp.now_s))
                else:
                    down[spec_i.instance_id] = spec_i
                    dp.inject(InstanceDown(spec_i.instance_id, dp.now_s))
            elif submitted:
                rid = submitted[index % len(submitted)]
                dp.inject(
                    RequestCancelled(rid, dp.now_s)
                    if kind == "cancel"
                    else RequestFailed(rid, kind == "retry", dp.now_s, kind)
                )
        dp.step()
        if check:
            check_invariants(dp.policy, dp.now_s, submitted, dp.mixed)
    dp.inject(*(InstanceUp(spec, dp.now_s) for spec in down.values()))
    for _ in range(DRAIN_STEPS):
        dp.step()
        if check:
            check_invariants(dp.policy, dp.now_s, submitted, dp.mixed)
        if dp.policy.num_active_requests() == 0:
            break
    return dp


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(sc=scenarios())
def test_invariants_hold_and_every_admitted_request_ends(sc: Scenario) -> None:
    # Execute
    dp = play(sc)

    # Assert
    policy = dp.policy
    assert policy.num_active_requests() == 0, policy.cluster_view(dp.now_s)
    views = {v.request_id: v for v in policy.take_completed()}
    assert set(views) == {spec.request_id for _, spec in sc.arrivals}
    assert all(i.kv_used_tokens == 0 for i in policy.cluster_view(dp.now_s).instances)
    for view in views.values():
        if view.state is RequestState.FINISHED:
            assert view.output_tokens >= view.spec.max_new_tokens
            assert view.prefill_done_s is not None and view.first_scheduled_s is not None
            assert view.chunks_done == view.chunks_total
        else:
            assert view.state in (RequestState.CANCELLED, RequestState.FAILED)
            assert view.error


@settings(max_examples=12, deadline=None, derandomize=True)
@given(sc=scenarios(), seed=st.integers(0, 3))
def test_same_events_and_seed_give_identical_decisions(sc: Scenario, seed: int) -> None:
    first = play(sc, seed, check=False)
    second = play(sc, seed, check=False)
    assert first.log == second.log


@settings(max_examples=25, deadline=None, derandomize=True)
@given(sc=scenarios(policy="pecsched"))
def test_pecsched_chunks_run_once_each_despite_pauses(sc: Scenario) -> None:
    dp = play(sc)
    for view in dp.policy.take_completed():
        if view.state is RequestState.FINISHED and view.num_requeues == 0:
            assert dp.chunks_run[view.request_id] == list(range(view.chunks_total)), view


def _drawn_config(
    *, max_sp_degree: int, long_aging_s: float | None = None, chunk_tokens: int = 2_000
) -> dict[str, object]:
    """The config of a shrunk random draw: no pause budget, decode batches of one, one transfer
    attempt; what the draws varied is given."""
    return {
        "chunk_tokens": chunk_tokens,
        "max_pause_s": 0.0,
        "max_decode_batch": 1,
        "long_aging_s": long_aging_s,
        "max_sp_degree": max_sp_degree,
        "max_kv_transfer_attempts": 1,
    }


def test_an_instance_that_went_down_while_held_is_held_once_when_back() -> None:
    # Prepare: shrunk from a random draw. Two longs wait behind 23 one-token shorts; the aged
    # long holds i0, i0 goes down and comes back up (a new record, free), and the long must not
    # count the old hold and then hold i0 again (a group of [i0, i0, i2]: "i0 busy").
    def req(k: int, prompt_tokens: int, max_new: int) -> RequestSpec:
        return make_request(f"r{k:02d}", prompt_tokens=prompt_tokens, max_new_tokens=max_new)

    longs = {8: 89_971, 17: 59_971}
    arrivals = tuple((0, req(k, longs[k], 30) if k in longs else req(k, 1, 1)) for k in range(25))
    sc = Scenario(
        policy="pecsched",
        instances=tuple(
            make_instance(f"i{k}", node_id=f"n{k // 2}", kv_capacity_tokens=30_000)
            for k in range(4)
        )
        + (make_instance("i4", node_id="n2", kv_capacity_tokens=60_000),),
        config=_drawn_config(max_sp_degree=8, long_aging_s=5.0),
        arrivals=arrivals,
        faults=((6, "down", 0),),
        transfer_fault_rate=0.0,
    )

    # Execute
    dp = play(sc)

    # Assert
    assert dp.policy.num_active_requests() == 0
    assert {v.state for v in dp.policy.take_completed()} == {RequestState.FINISHED}


def test_an_instance_back_up_is_offered_once() -> None:
    # Prepare: shrunk from a random draw. i1 goes down and comes back at once (a new record):
    # the heap entries of its old record must not pass for the new one's, or a long request's
    # SP group of 2 is [i1, i1] ("i1 busy").
    sc = Scenario(
        policy="pecsched",
        instances=(
            make_instance("i0", node_id="n0", kv_capacity_tokens=30_000),
            make_instance("i1", node_id="n0", kv_capacity_tokens=60_000),
            make_instance("i2", node_id="n1", kv_capacity_tokens=30_000),
        ),
        config=_drawn_config(max_sp_degree=2),
        arrivals=((1, make_request("r06", prompt_tokens=4_096, arrival_s=1.0)),),
        faults=((0, "down", 1), (0, "down", 1)),
        transfer_fault_rate=0.0,
    )

    # Execute
    dp = play(sc)

    # Assert
    assert [v.state for v in dp.policy.take_completed()] == [RequestState.FINISHED]


def test_a_prefill_whose_decode_instance_went_down_decodes_where_it_was_prefilled() -> None:
    # Prepare: shrunk from a random draw. distserve starts the long r06 for a transfer to the
    # large decode instance i1; i1 goes down, and the decode instance left (i4) can never hold
    # it: it must decode where it was prefilled, not wait for a transfer forever.
    sc = Scenario(
        policy="distserve",
        instances=tuple(
            make_instance(f"i{k}", node_id=f"n{k // 2}", kv_capacity_tokens=kv)
            for k, kv in enumerate((30_000, 120_000, 30_000, 120_000))
        )
        + (
            make_instance(
                "i4", node_id="n2", kv_capacity_tokens=30_000, role=InstanceRole.SHORT_DECODE
            ),
        ),
        config=_drawn_config(max_sp_degree=1),
        arrivals=(
            (0, make_request("r04", prompt_tokens=215, max_new_tokens=15)),
            (0, make_request("r06", prompt_tokens=63_394, max_new_tokens=27)),
        ),
        faults=((2, "down", 1),),
        transfer_fault_rate=0.0,
    )

    # Execute
    dp = play(sc)

    # Assert
    states = {v.request_id: v.state for v in dp.policy.take_completed()}
    assert states == {"r04": RequestState.FINISHED, "r06": RequestState.FINISHED}


def test_an_aged_long_whose_holds_can_never_hold_it_gathers_afresh_at_once() -> None:
    # Prepare: shrunk from a random draw. r11 (150K tokens, SP of at most 2) holds i1 (30K,
    # back up) and one 120K instance while r04 (priority 1) runs: two holds that can never
    # hold it. Released "for next time", nothing else would ever wake the plan: it must
    # gather afresh in the same call (i0 + i2).
    sc = Scenario(
        policy="pecsched-no-disagg",
        instances=(
            make_instance("i0", node_id="n0", kv_capacity_tokens=120_000),
            make_instance("i1", node_id="n0", kv_capacity_tokens=30_000),
            make_instance("i2", node_id="n1", kv_capacity_tokens=120_000),
        ),
        config=_drawn_config(max_sp_degree=2, long_aging_s=5.0, chunk_tokens=8_192),
        arrivals=(
            (0, make_request("r00", prompt_tokens=96_411, max_new_tokens=1)),
            (0, make_request("r11", prompt_tokens=150_000, max_new_tokens=1)),
            (30, make_request("r04", prompt_tokens=120_009, priority=1, arrival_s=30.0)),
        ),
        faults=((0, "down", 1),),
        transfer_fault_rate=0.0,
    )

    # Execute
    dp = play(sc)

    # Assert
    states = {v.request_id: v.state for v in dp.policy.take_completed()}
    assert states == dict.fromkeys(("r00", "r04", "r11"), RequestState.FINISHED)


def test_a_mixed_prefill_placed_again_as_a_plain_one_holds_its_slots() -> None:
    # Prepare: shrunk from a random draw. sarathi mixes r09 into i4's batch; i4 goes down and
    # r09 is placed again as an SP prefill on (i1, i2), which holds their slots: the fake data
    # plane must stop counting it as a mixed prefill (it did, and the slot check failed).
    sc = Scenario(
        policy="sarathi",
        instances=tuple(
            make_instance(f"i{k}", node_id=f"n{k // 2}", kv_capacity_tokens=30_000)
            for k in range(4)
        )
        + (make_instance("i4", node_id="n2", kv_capacity_tokens=60_000),),
        config=_drawn_config(max_sp_degree=2),
        arrivals=(
            (0, make_request("r08", prompt_tokens=1, max_new_tokens=1)),
            (0, make_request("r09", prompt_tokens=29_971, max_new_tokens=30)),
        ),
        faults=((3, "down", 4),),
        transfer_fault_rate=0.0,
    )

    # Execute
    dp = play(sc)

    # Assert
    states = {v.request_id: v.state for v in dp.policy.take_completed()}
    assert states == dict.fromkeys(("r08", "r09"), RequestState.FINISHED)
