"""Engine timing on hand-computed scenarios, driven by a small scripted policy.

The scripted policy reacts to events with fixed actions, so every simulated time can be derived
by hand from the cost model: the engine, not a policy, is under test here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from controlplane.core import actions as act
from controlplane.core import events as ev
from controlplane.core.config import SchedulerConfig
from controlplane.core.types import SpKind
from sim.cost_model import CostModel, Efficiency
from sim.engine import ClusterSpec, Engine, SimRun
from sim.hardware import GPUS, MODELS

Script = Callable[[ev.Event, float], list[act.Action]]


class ScriptedPolicy:
    """Answers each observed event with the actions `script` returns for it."""

    name = "scripted"

    def __init__(self, script: Script) -> None:
        self.config = SchedulerConfig()
        self._script = script
        self._pending: list[act.Action] = []
        self._active: set[str] = set()

    def observe(self, events: Sequence[ev.Event]) -> None:
        for e in events:
            if isinstance(e, ev.RequestArrived):
                self._active.add(e.spec.request_id)
            if isinstance(e, ev.RequestFinished):
                self._active.discard(e.request_id)
            self._pending += self._script(e, e.at_s)

    def schedule(self, now_s: float) -> act.Decision:
        actions, self._pending = tuple(self._pending), []
        return act.Decision(actions)

    def num_active_requests(self) -> int:
        return len(self._active)

    def take_completed(self) -> tuple[()]:
        return ()


COST = CostModel(MODELS["mistral-7b"], GPUS["a100"], efficiency=Efficiency(overhead_s=0.002))


def _run(script: Script, arrivals: list[tuple[float, int, int]], gpus: int = 2) -> SimRun:
    arrival, prompt, output = (np.array(col) for col in zip(*arrivals, strict=True))
    engine = Engine(
        ClusterSpec(gpus, COST),
        ScriptedPolicy(script),  # type: ignore[arg-type]
        arrival.astype(np.float64),
        prompt.astype(np.int64),
        output.astype(np.int64),
        lambda p, o: 1.0,
        log_decisions=True,
    )
    return engine.run()


def _prefill(
    rid: str, group: tuple[str, ...], chunk: int, n: int, in_place: bool = True, first: int = 0
) -> act.StartPrefill:
    return act.StartPrefill(rid, group, SpKind.ULYSSES, chunk, n, first, in_place, "test")


def test_single_request_prefill_then_decode_in_place() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived):
            return [_prefill(e.spec.request_id, ("i00000",), 8192, 1)]
        return []

    run = _run(script, [(1.0, 1000, 11)])

    ttft = COST.prefill_s(1000)
    assert run.records.first_scheduled_s[0] == 1.0
    assert run.records.first_token_s[0] == pytest.approx(1.0 + ttft)
    decode = COST.decode_s(1, 1001)  # ten more tokens at the context of the first iteration
    assert run.records.finished_s[0] == pytest.approx(1.0 + ttft + 10 * decode)
    assert run.busy_gpu_s == pytest.approx(ttft + 10 * decode)


def test_pause_at_chunk_boundary_and_resume_without_recompute() -> None:
    long_chunks = [COST.prefill_s(8192, 8192 * i) for i in range(3)]

    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived) and e.spec.request_id == "0":
            return [_prefill("0", ("i00000",), 8192, 3)]
        if isinstance(e, ev.RequestArrived):  # the short arrives during chunk 0
            return [act.Pause("0", ("i00000",), "short"), _prefill("1", ("i00000",), 8192, 1)]
        if isinstance(e, ev.PrefillDone) and e.request_id == "1":
            return [act.Resume("0", ("i00000",), "short done")]
        return []

    run = _run(script, [(0.0, 3 * 8192, 1), (0.1, 2000, 1)])

    short_start = long_chunks[0]  # waits for the chunk in flight
    short_done = short_start + COST.prefill_s(2000)
    assert run.records.first_scheduled_s[1] == pytest.approx(short_start)  # after the chunk
    assert run.records.first_token_s[1] == pytest.approx(short_done)
    assert run.records.finished_s[0] == pytest.approx(short_done + sum(long_chunks[1:]))
    assert run.records.preemptions.tolist() == [1, 0]


def test_sp_group_prefill_and_kv_transfer_to_decode_instance() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived):
            return [_prefill("0", ("i00000", "i00001"), 8192, 2, in_place=False)]
        if isinstance(e, ev.PrefillDone):
            return [act.TransferKV("0", "i00000", "i00002", "test")]
        if isinstance(e, ev.KVTransferDone):
            return [act.StartDecode("0", "i00002", "test")]
        return []

    run = _run(script, [(0.0, 16384, 3)], gpus=3)

    prefill = COST.sp_prefill_s(8192, 0, 2) + COST.sp_prefill_s(8192, 8192, 2)
    transfer = COST.kv_transfer_s(16385, cross_node=False)
    decode = 2 * COST.decode_s(1, 16385)
    assert run.records.first_token_s[0] == pytest.approx(prefill)
    assert run.records.finished_s[0] == pytest.approx(prefill + transfer + decode)


def test_colocated_prefill_shares_long_decode_iterations() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived) and e.spec.request_id == "0":
            return [_prefill("0", ("i00000",), 8192, 1)]
        if isinstance(e, ev.RequestArrived):
            return [act.Colocate("1", "i00000", 512, 8192, 1, True, "test")]
        return []

    prefill_long = COST.prefill_s(8000)
    # The short arrives while the long decodes; 1024 prompt tokens = 2 iterations of 512.
    run = _run(script, [(0.0, 8000, 1000), (prefill_long + 0.05, 1024, 2)])

    start = prefill_long + 0.05
    mixed_ctx = 8001 + 0.05 / COST.decode_s(1, 8001)  # the long's context when the short joins
    mixed = COST.iteration_s(512, 1024 * 1025 / 2 / 2, 512, 1, 1, mixed_ctx)
    assert run.records.first_token_s[1] == pytest.approx(start + 2 * mixed, rel=1e-6)
    assert run.records.finished_s[1] > run.records.first_token_s[1]
    assert run.records.finished_s[0] > prefill_long + 999 * COST.decode_s(1, 8001)


def test_one_token_request_finishes_at_prefill_done() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived):
            return [_prefill(e.spec.request_id, ("i00000",), 8192, 1)]
        return []

    run = _run(script, [(0.0, 100, 1)])

    assert run.records.finished_s[0] == run.records.first_token_s[0] == COST.prefill_s(100)


def test_decode_beside_long_chunks_counts_one_slow_gap_per_chunk() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived) and e.spec.request_id == "0":
            return [_prefill("0", ("i00000",), 8192, 1)]
        if isinstance(e, ev.RequestArrived):  # the long prefills beside the short's decode
            return [_prefill("1", ("i00000",), 8192, 3)]
        return []

    first_token = COST.prefill_s(100)
    assert COST.prefill_s(8192) > 0.1 > COST.decode_s(1, 101)  # chunks are slow gaps, decodes not
    run = _run(script, [(0.0, 100, 6), (first_token + 0.001, 3 * 8192, 1)])

    # The short's 5 gaps: three ride on the long's chunks, two are plain decode iterations.
    assert run.records.tbt_gaps_over_slo is not None
    assert run.records.tbt_gaps_over_slo.tolist() == [3, 0]
    assert run.records.tbt_slo_s == 0.1


def test_slow_kv_handoff_counts_as_one_slow_gap() -> None:
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived):
            return [_prefill("0", ("i00000",), 8192, 4, in_place=False)]
        if isinstance(e, ev.PrefillDone):
            return [act.TransferKV("0", "i00000", "i00008", "test")]
        if isinstance(e, ev.KVTransferDone):
            return [act.StartDecode("0", "i00008", "test")]
        return []

    assert COST.kv_transfer_s(32769, cross_node=True) > 0.1  # to another node: a slow handoff
    run = _run(script, [(0.0, 32768, 3)], gpus=9)

    assert run.records.tbt_gaps_over_slo is not None
    assert run.records.tbt_gaps_over_slo.tolist() == [1]
