"""KV cache allocator, admission refusals, cancel, and KV export/import between engines."""

from __future__ import annotations

import pytest
from conftest import Oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.kv_cache import RangeAllocator
from dataplane.engine.requests import RequestState
from dataplane.engine.types import PrefillDone, SamplingParams

NEW_TOKENS = 12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=60))
def test_allocator_never_overlaps_and_coalesces_back_to_one_extent(
    ops: list[tuple[bool, int]],
) -> None:
    # Prepare
    alloc = RangeAllocator(128)
    live: dict[int, int] = {}

    # Execute: allocate on True, free the oldest live range on False.
    for is_alloc, size in ops:
        if is_alloc:
            start = alloc.allocate(size)
            if start is None:
                assert alloc.largest_free_tokens < size
                continue
            live[start] = size
        elif live:
            alloc.free(next(iter(live)))
            del live[next(iter(live))]
        rows = sorted((s, s + n) for s, n in live.items())
        assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:], strict=False)), rows
        assert all(0 <= s and e <= 128 for s, e in rows)
        assert alloc.num_free_tokens == 128 - sum(live.values())
    for start in list(live):
        alloc.free(start)

    # Assert
    assert alloc.largest_free_tokens == 128


def test_request_that_does_not_fit_is_refused_and_the_engine_keeps_working(
    oracle: Oracle,
) -> None:
    # Prepare: a 100-row pool; "a" holds 60 rows.
    engine = oracle.engine(kv_tokens=100)
    prompt = oracle.prompt(50, 50)
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=11))

    # Execute / Assert: 50 + 11 - 1 = 60 more rows do not fit in the 40 left.
    with pytest.raises(EngineError) as refused:
        engine.add_request("b", prompt, SamplingParams(max_new_tokens=11))
    assert refused.value.code is EngineErrorCode.DOES_NOT_FIT
    assert "needs 60 KV tokens; 40 of 100 are free" in str(refused.value)
    assert not engine.can_fit(50, 11) and engine.can_fit(30, 11)
    with pytest.raises(EngineError, match="exceeds the model limit"):
        engine.add_request("c", [1], SamplingParams(max_new_tokens=10**6))
    assert oracle.run(engine) == {"a": oracle.greedy(prompt, 11)}


def test_bad_requests_are_refused_with_the_field_named(oracle: Oracle) -> None:
    engine = oracle.engine()
    with pytest.raises(EngineError, match="prompt_token_ids is empty"):
        engine.add_request("a", [], SamplingParams(max_new_tokens=1))
    with pytest.raises(EngineError, match="prompt_token_ids must be in"):
        engine.add_request("a", [10**6], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(EngineError, match="kv_budget_bytes is required"):
        from dataplane.engine.engine import Engine, EngineConfig

        Engine(oracle.model, EngineConfig())


@pytest.mark.parametrize("steps_before_cancel", [0, 1, 6])
def test_cancel_frees_all_kv_at_once_in_any_state(oracle: Oracle, steps_before_cancel: int) -> None:
    # Prepare: cancel while prefilling (0), mid-prefill after a chunk (1), or decoding (6).
    engine = oracle.engine(kv_tokens=500, chunk_tokens=20)
    engine.add_request("a", oracle.prompt(60, 30), SamplingParams(max_new_tokens=50))
    engine.add_request("b", oracle.prompt(61, 30), SamplingParams(max_new_tokens=50))
    for _ in range(steps_before_cancel):
        engine.step()
    engine.pause("b")

    # Execute
    freed = engine.cancel("a") + engine.cancel("b")

    # Assert
    assert freed == 2 * 79
    assert engine.num_free_kv_tokens == 500 and engine.kv.allocator.largest_free_tokens == 500
    assert engine.step() == []
    with pytest.raises(EngineError) as unknown:
        engine.cancel("a")
    assert unknown.value.code is EngineErrorCode.UNKNOWN_REQUEST


@pytest.mark.parametrize("decode_steps_before_export", [0, 5])
def test_kv_exported_from_one_engine_decodes_identically_in_another(
    oracle: Oracle, decode_steps_before_export: int
) -> None:
    # Prepare: prefill on engine A and hold (or decode a few tokens there first).
    prompt = oracle.prompt(70, 37)
    want = oracle.greedy(prompt, NEW_TOKENS)
    oracle.assert_varied(want)
    source, target = oracle.engine(chunk_tokens=10), oracle.engine(kv_tokens=300)
    source.add_request(
        "a", prompt, SamplingParams(max_new_tokens=NEW_TOKENS), hold_after_prefill=True
    )
    while not any(isinstance(e, PrefillDone) for e in source.step()):
        pass
    assert source.request_state("a") is RequestState.HELD
    if decode_steps_before_export:
        source.resume("a")
        for _ in range(decode_steps_before_export):
            source.step()
        source.pause("a")

    # Execute
    export = source.export_kv("a")
    keys = tuple(k.clone() for k in export.keys)  # what a receiver would hold
    values = tuple(v.clone() for v in export.values)
    source.cancel("a")
    from dataplane.engine.types import KVExport

    target.import_kv(KVExport(export.metadata, keys, values))
    outputs = oracle.run(target)

    # Assert
    meta = export.metadata
    assert meta.num_kv_tokens == 37 + decode_steps_before_export
    assert len(export.keys) == oracle.model.shape.num_layers
    assert keys[0].shape == (meta.num_kv_tokens, meta.num_kv_heads, meta.head_dim)
    assert outputs == {"a": want}
    assert source.num_free_kv_tokens == 4096 and target.num_free_kv_tokens == 300


def test_partial_prefill_exported_mid_prompt_continues_on_the_importer(oracle: Oracle) -> None:
    # Prepare
    prompt = oracle.prompt(71, 40)
    want = oracle.greedy(prompt, NEW_TOKENS)
    source, target = oracle.engine(chunk_tokens=16), oracle.engine()
    source.add_request("a", prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
    source.step()
    source.pause("a")

    # Execute
    target.import_kv(source.export_kv("a"))
    outputs = oracle.run(target)

    # Assert
    assert source.export_kv("a").metadata.num_kv_tokens == 16
    assert outputs == {"a": want}


def test_import_into_a_different_layout_is_refused(oracles: dict[str, Oracle]) -> None:
    # Prepare
    tiny, qwen = oracles["tiny"], oracles["tiny-qwen2"]
    source = tiny.engine()
    source.add_request("a", tiny.prompt(72, 8), SamplingParams(max_new_tokens=4))
    source.step()

    # Execute / Assert
    with pytest.raises(EngineError) as refused:
        qwen.engine().import_kv(source.export_kv("a"))
    assert refused.value.code is EngineErrorCode.KV_MISMATCH


def test_sampled_request_continues_its_random_stream_after_transfer(oracle: Oracle) -> None:
    # Prepare: the same seeded request decoded locally, and moved after its first token.
    prompt = oracle.prompt(73, 15)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=9)
    local = oracle.engine()
    local.add_request("a", prompt, params)
    want = oracle.run(local)["a"]
    source, target = oracle.engine(), oracle.engine()
    source.add_request("a", prompt, params, hold_after_prefill=True)
    source.step()

    # Execute
    target.import_kv(source.export_kv("a"))
    outputs = oracle.run(target)

    # Assert
    assert outputs == {"a": want}
