"""Mixed batches (sarathi's Colocates with `mixed_batch_tokens`) on hand-computed timings, and
the new baselines end to end on a tiny trace."""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_engine import COST, _run

from controlplane.core import actions as act
from controlplane.core import events as ev
from controlplane.core.config import SchedulerConfig
from sim.cost_model import causal_pairs
from sim.engine import ClusterSpec
from sim.runner import run_policy
from sim.workloads import Workload


def _mixed(rid: str, prompt: int, cap: int) -> act.Colocate:
    return act.Colocate(rid, "i00000", cap, cap, -(-prompt // cap), True, "test", 2048)


def test_a_short_prefill_shares_a_long_chunks_iteration_under_the_budget() -> None:
    # Prepare: a 3,000-token prompt capped at 1,024 per iteration and a 1,500-token one, budget
    # 2,048, admitted together on one instance
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived):
            prompt = e.spec.prompt_tokens
            return [_mixed(e.spec.request_id, prompt, 1024 if prompt > 1024 else 2048)]
        return []

    # Execute
    run = _run(script, [(0.0, 3000, 2), (0.0, 1500, 2)], gpus=1)

    # Assert: it 1: 1,024 + 1,024; it 2: 1,024 + the short's last 476 (it decodes from it 3);
    # it 3: the long's last 952 beside the short's decode
    it1 = COST.iteration_s(2048, 2 * causal_pairs(1024, 0), 0, 2, 0, 0)
    it2 = COST.iteration_s(1500, causal_pairs(1024, 1024) + causal_pairs(476, 1024), 2048, 2, 0, 0)
    it3 = COST.iteration_s(952, causal_pairs(952, 2048), 2048, 1, 1, 1501)
    assert run.records.first_scheduled_s.tolist() == [0.0, 0.0]
    assert run.records.first_token_s[1] == pytest.approx(it1 + it2, rel=1e-9)
    assert run.records.first_token_s[0] == pytest.approx(it1 + it2 + it3, rel=1e-9)


def test_decodes_take_the_budget_first() -> None:
    # Prepare: a request decoding, then a prompt larger than the budget left
    def script(e: ev.Event, now: float) -> list[act.Action]:
        if isinstance(e, ev.RequestArrived) and e.spec.request_id == "0":
            return [_mixed("0", 100, 2048)]
        if isinstance(e, ev.RequestArrived):
            return [_mixed("1", 2048, 2048)]
        return []

    first = COST.iteration_s(100, causal_pairs(100, 0), 0, 1, 0, 0)

    # Execute: the second arrives while the first decodes
    run = _run(script, [(0.0, 100, 1000), (first + 1e-3, 2048, 2)], gpus=1)

    # Assert: 2,047 prompt tokens fit beside the decode, the last one takes an iteration more
    ctx = 101 + 1e-3 / COST.decode_s(1, 101)  # the decode's context when the prompt joins
    it1 = COST.iteration_s(2047, causal_pairs(2047, 0), 0, 1, 1, ctx)
    it2 = COST.iteration_s(1, causal_pairs(1, 2047), 2047, 1, 1, ctx + 1)
    assert run.records.first_token_s[1] == pytest.approx(first + 1e-3 + it1 + it2, rel=1e-9)


@pytest.mark.parametrize("name", ["sarathi", "distserve", "reservation"])
def test_new_baselines_finish_a_tiny_mixed_trace(name: str) -> None:
    # Prepare: 40 shorts and 2 longs (one needs an SP group) on 4 A100s
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 3000, 42)
    prompt[5], prompt[20] = 200_000, 480_000
    workload = Workload(
        np.sort(rng.uniform(0, 20, 42)), prompt.astype(np.int64), np.full(42, 20, np.int64)
    )

    # Execute
    summary = run_policy(workload, ClusterSpec(4, COST), name, SchedulerConfig(), 0)

    # Assert
    result = summary.result.summary
    assert result.short.count == 40 and result.long.count == 2
    assert np.isfinite(summary.run.records.finished_s).all()
