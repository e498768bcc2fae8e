"""SP prefill + decode of the tiny preset over real gloo groups of k = 2, 3, 4 CPU workers.

Oracles: a single worker's engine (chunked prefill) and transformers' greedy `generate` on the
same weights (the `oracles` fixture of conftest.py, seed 7). Ulysses vs ring logits agree to
rtol = atol = 1e-4 (float32; only the attention summation order and LSE merge differ).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from dist_utils import WorkerPool, shared_pool

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.errors import EngineError
from dataplane.engine.types import Finished, SamplingParams
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config
from dataplane.parallel.groups import (
    Group,
    GroupError,
    GroupManager,
    GroupSpec,
    connect_store,
    make_backend_factory,
)
from dataplane.parallel.sp_runner import SpRequest
from dataplane.parallel.topology import SpKind

SEED = 7  # the conftest oracle's weights
SHORT_PROMPT = [5, 17, 99, 3, 250, 8, 61, 140]
LOGIT_TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def pool() -> WorkerPool:
    return shared_pool(4)


def _prompt(seed: int, num_tokens: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = torch.randint(0, 256, (num_tokens,), generator=gen).tolist()
    return tokens


def _engine() -> Engine:
    model = random_model(
        preset_config("tiny"), seed=SEED, dtype=torch.float32, device=torch.device("cpu")
    )
    return Engine(
        model, EngineConfig(kv_budget_bytes=12000 * model.shape.kv_bytes_per_token(torch.float32))
    )


def _run_engine(engine: Engine) -> list[int]:
    while True:
        for event in engine.step():
            if isinstance(event, Finished):
                return list(event.output_token_ids)


def _sp_job(
    group: Group,
    _: Any,
    prompt: list[int],
    chunk_tokens: int,
    kind: int,
    max_new_tokens: int,
    pause_after: int | None = None,
    die_after: int | None = None,
) -> Any:
    engine = _engine()
    free_before = engine.num_free_kv_tokens
    sp = SpRequest(
        engine.model,
        group,
        "long",
        prompt,
        max_new_tokens=max_new_tokens,
        chunk_tokens=chunk_tokens,
        kind=SpKind(kind),
        pool=engine.kv,
    )
    short_tokens = None
    while not sp.is_prefill_done:
        if sp.num_chunks_done == die_after and group.rank == group.size - 1:
            os._exit(1)  # a member dies between chunks; the others are mid-collective next
        if sp.num_chunks_done == pause_after and group.rank == 0:
            # Paused long prefill: member 0 serves a short request on its own engine meanwhile.
            engine.add_request("short", SHORT_PROMPT, SamplingParams(max_new_tokens=4))
            short_tokens = _run_engine(engine)
        t0 = time.monotonic()
        try:
            logits = sp.run_next_chunk()
        except GroupError as exc:
            elapsed_s = time.monotonic() - t0
            freed = engine.num_free_kv_tokens == free_before
            engine.add_request("after", SHORT_PROMPT, SamplingParams(max_new_tokens=4))
            return "failed", str(exc), elapsed_s, freed, _run_engine(engine)
    prefill_logits = logits
    token = sp.share_token(None if logits is None else int(logits.argmax()))
    tokens, decode_logits = [token], []
    for _ in range(max_new_tokens - 1):
        step_logits = sp.decode(token)
        decode_logits.append(step_logits)
        token = int(step_logits.argmax())
        tokens.append(token)
    sp.free()
    freed = engine.num_free_kv_tokens == free_before
    return tokens, prefill_logits, torch.stack(decode_logits), short_tokens, freed


def _single_worker(oracle: Any, prompt: list[int], num_tokens: int) -> list[int]:
    engine = oracle.engine(kv_tokens=len(prompt) + num_tokens + 8, chunk_tokens=1024)
    engine.add_request("ref", prompt, SamplingParams(max_new_tokens=num_tokens))
    return list(oracle.run(engine)["ref"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "num_tokens", "chunk_tokens", "kind"),
    [
        (2, 1000, 384, SpKind.ULYSSES),  # 3 chunks: 384, 384, 232
        (3, 2311, 1000, SpKind.ULYSSES),  # uneven shards (334/333/333) and a 311-token tail
        (4, 4999, 2500, SpKind.ULYSSES),  # one query head per member, KV heads replicated
        (3, 1402, 700, SpKind.RING),  # a 2-token tail (< k) joins the chunk before it
    ],
)
def test_sp_greedy_tokens_equal_single_worker_and_transformers(
    pool: WorkerPool,
    oracles: dict[str, Any],
    size: int,
    num_tokens: int,
    chunk_tokens: int,
    kind: SpKind,
) -> None:
    # Prepare
    oracle, prompt, num_new = oracles["tiny"], _prompt(num_tokens, num_tokens), 6

    # Execute
    results = pool.run(_sp_job, list(range(size)), prompt, chunk_tokens, kind.value, num_new)

    # Assert
    expected = oracle.greedy(prompt, num_new)
    oracle.assert_varied(expected)
    assert _single_worker(oracle, prompt, num_new) == expected
    for tokens, _, _, _, freed in results:
        assert tokens == expected
        assert freed


def test_ulysses_and_ring_agree_on_prefill_and_decode_logits(pool: WorkerPool) -> None:
    # Prepare
    prompt = _prompt(3, 1234)

    # Execute
    uly = pool.run(_sp_job, [0, 1, 2], prompt, 400, SpKind.ULYSSES.value, 4)
    ring = pool.run(_sp_job, [0, 1, 2], prompt, 400, SpKind.RING.value, 4)

    # Assert: rank 2 holds the last token (1234 = 3 chunks of 400 + 34 -> 12/11/11).
    assert uly[0][1] is None and uly[2][1] is not None
    torch.testing.assert_close(uly[2][1], ring[2][1], **LOGIT_TOL)
    for rank in range(3):
        torch.testing.assert_close(uly[rank][2], ring[rank][2], **LOGIT_TOL)
        assert uly[rank][0] == ring[rank][0]


def test_paused_sp_prefill_serving_a_short_request_matches_unpaused(
    pool: WorkerPool, oracles: dict[str, Any]
) -> None:
    # Prepare
    prompt = _prompt(5, 1100)

    # Execute
    paused = pool.run(_sp_job, [0, 1], prompt, 300, SpKind.ULYSSES.value, 5, 2)
    unpaused = pool.run(_sp_job, [0, 1], prompt, 300, SpKind.ULYSSES.value, 5)

    # Assert
    assert paused[0][0] == unpaused[0][0] == paused[1][0]
    torch.testing.assert_close(paused[0][2], unpaused[0][2], rtol=0, atol=0)
    assert paused[0][3] == oracles["tiny"].greedy(SHORT_PROMPT, 4)


@pytest.mark.parametrize("kind", [SpKind.ULYSSES, SpKind.RING])
def test_member_killed_mid_sp_prefill_fails_survivors_fast_frees_kv_and_they_keep_serving(
    pool: WorkerPool, oracles: dict[str, Any], kind: SpKind
) -> None:
    # Prepare
    prompt = _prompt(9, 900)

    # Execute: member 2 dies after chunk 1 of 3.
    results = pool.run(_sp_job, [0, 1, 2], prompt, 300, kind.value, 4, None, 1, expect=2)
    pool.restart(2)

    # Assert
    short_expected = oracles["tiny"].greedy(SHORT_PROMPT, 4)
    for status, message, elapsed_s, freed, short_tokens in results[:2]:
        assert status == "failed" and "failed" in message
        assert elapsed_s < 10.0  # well inside the 60 s group timeout: the dead peer is detected
        assert freed
        assert short_tokens == short_expected


def test_sp_kv_comes_from_the_engine_pool_and_a_request_that_does_not_fit_is_refused() -> None:
    # Prepare: a one-member group in this process; the pool holds 2,000 tokens.
    store = connect_store("127.0.0.1", 0, 10.0, is_master=True)
    manager = GroupManager(store, "solo", make_backend_factory("cpu", "127.0.0.1"), 10.0)
    group = manager.connect(GroupSpec("solo-sp", ("solo",)))
    model = random_model(
        preset_config("tiny"), seed=SEED, dtype=torch.float32, device=torch.device("cpu")
    )
    engine = Engine(
        model, EngineConfig(kv_budget_bytes=2000 * model.shape.kv_bytes_per_token(torch.float32))
    )

    # Execute
    sp = SpRequest(
        model, group, "fits", _prompt(1, 1500), max_new_tokens=4, chunk_tokens=512, pool=engine.kv
    )
    held = engine.num_free_kv_tokens
    with pytest.raises(EngineError, match="DOES_NOT_FIT"):
        SpRequest(
            model,
            group,
            "too-big",
            _prompt(2, 600),
            max_new_tokens=4,
            chunk_tokens=512,
            pool=engine.kv,
        )
    sp.free()

    # Assert
    assert held <= 2000 - 1504 and engine.num_free_kv_tokens == 2000
    manager.close()
