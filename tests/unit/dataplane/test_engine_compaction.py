"""KV pool compaction: fragmented pools admit what their free total fits; moved requests decode
exactly; pinned (exported / importing) ranges never move; a property over random op sequences."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import Oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.kv_cache import KVCache, KVRange
from dataplane.engine.requests import RequestState
from dataplane.engine.types import SamplingParams


def _rows(engine: Engine, request_id: str) -> torch.Tensor:
    """A copy of every layer's K and V rows of a resident request: (L, 2, rows, Hkv, D)."""
    start = engine._get(request_id).kv_start
    num_tokens = engine._get(request_id).num_computed_tokens
    return engine.kv.pool[:, :, start : start + num_tokens].clone()


def test_fragmented_pool_admits_after_compaction_and_moved_requests_decode_exactly(
    oracle: Oracle,
) -> None:
    # Prepare: a [0,30) b [30,80) c [80,120) d [120,170) free [170,200).
    engine = oracle.engine(kv_tokens=200, chunk_tokens=8, max_batch_tokens=64)
    sizes = {"a": (24, 7), "b": (44, 7), "c": (34, 7), "d": (42, 9), "e": (62, 9)}
    prompts = {rid: oracle.prompt(100 + i, n) for i, (rid, (n, _)) in enumerate(sizes.items())}
    want = {rid: oracle.greedy(prompts[rid], new) for rid, (_, new) in sizes.items()}
    for rid in "abcd":
        engine.add_request(rid, prompts[rid], SamplingParams(max_new_tokens=sizes[rid][1]))
    engine.step()  # one 8-token chunk each
    engine.pause("c")  # c: paused mid-prefill (8 of 34 prompt tokens)
    engine.cancel("b")  # free: [30,80) 50 + [170,200) 30 rows
    while len(engine._get("d").output_token_ids) < 3:  # d: mid-decode
        engine.step()
    before = {rid: (engine._get(rid).kv_start, _rows(engine, rid)) for rid in "acd"}
    assert engine.kv.allocator.largest_free_tokens == 50 and engine.num_free_kv_tokens == 80
    assert engine.largest_fit_kv_tokens == 80
    assert engine.can_fit(62, 9) and engine.can_fit_kv_tokens(80)
    assert not engine.can_fit_kv_tokens(81)

    # Execute: e needs 70 rows; only compaction makes room.
    engine.add_request("e", prompts["e"], SamplingParams(max_new_tokens=9))
    moved = {rid: engine._get(rid).kv_start for rid in "acde"}
    contents_kept = all(torch.equal(_rows(engine, rid), before[rid][1]) for rid in "acd")
    engine.resume("c")
    outputs = oracle.run(engine)

    # Assert
    assert {rid: start for rid, (start, _) in before.items()} == {"a": 0, "c": 80, "d": 120}
    assert moved == {"a": 0, "c": 30, "d": 70, "e": 120}
    assert engine.kv.num_compactions == 1 and engine.kv.num_moved_tokens == 90
    assert contents_kept
    assert outputs == {rid: want[rid] for rid in "acde"}
    assert engine.num_free_kv_tokens == 200 and engine.kv.allocator.largest_free_tokens == 200


def test_exported_range_is_pinned_and_its_views_stay_valid_through_compaction(
    oracle: Oracle,
) -> None:
    # Prepare: a [0,30) x [30,60) p [60,100) y [100,130) q [130,180) free [180,200); p is held
    # after its prefill and exported (pinned); x and y leave.
    engine = oracle.engine(kv_tokens=200, chunk_tokens=64, max_batch_tokens=256)
    sizes = {"a": (20, 11), "x": (20, 11), "p": (30, 11), "y": (20, 11), "q": (30, 21)}
    prompts = {rid: oracle.prompt(200 + i, n) for i, (rid, (n, _)) in enumerate(sizes.items())}
    for rid, (_, new) in sizes.items():
        engine.add_request(
            rid, prompts[rid], SamplingParams(max_new_tokens=new), hold_after_prefill=rid == "p"
        )
    engine.step()  # every prompt in one step; p is HELD
    engine.step()
    export = engine.export_kv("p")
    sent_keys = [k.clone() for k in export.keys]  # what the views hold before compaction
    sent_values = [v.clone() for v in export.values]
    engine.cancel("x")
    engine.cancel("y")  # free: 30 + 30 + 20 rows, largest extent 30

    # Execute: 55 rows cannot fit around the pinned p; 45 rows fit once q slides down.
    assert engine.largest_fit_kv_tokens == 50 and not engine.can_fit_kv_tokens(55)
    with pytest.raises(EngineError) as refused:
        engine.add_request("big", oracle.prompt(210, 35), SamplingParams(max_new_tokens=21))
    engine.add_request("e", oracle.prompt(211, 25), SamplingParams(max_new_tokens=21))
    starts = {rid: engine._get(rid).kv_start for rid in ("a", "p", "q", "e")}
    views_valid = all(
        torch.equal(view, sent)
        for view, sent in zip(export.keys + export.values, sent_keys + sent_values, strict=True)
    )
    target = oracle.engine(kv_tokens=100)
    target.import_kv(export)  # read through the outstanding views after compaction
    imported = oracle.run(target)

    # Assert
    assert refused.value.code is EngineErrorCode.DOES_NOT_FIT
    assert "needs 55 KV tokens; 80 of 200 are free, largest free extent 30" in str(refused.value)
    assert "(50 after compaction; 40 rows are pinned" in str(refused.value)
    assert starts == {"a": 0, "p": 60, "q": 100, "e": 150}
    assert views_valid and export.keys[0].data_ptr() == engine.kv.k_pools[0][60].data_ptr()
    assert imported == {"p": oracle.greedy(prompts["p"], 11)}


def test_released_export_moves_again_and_the_request_resumes_exactly(oracle: Oracle) -> None:
    # Prepare: h is held at [20,60) behind a cancelled range and exported twice.
    engine = oracle.engine(kv_tokens=100)
    prompt = oracle.prompt(220, 30)
    engine.add_request("gap", oracle.prompt(221, 10), SamplingParams(max_new_tokens=11))
    engine.add_request("h", prompt, SamplingParams(max_new_tokens=11), hold_after_prefill=True)
    while engine.request_state("h") is not RequestState.HELD:
        engine.step()
    engine.cancel("gap")
    kv_before = _rows(engine, "h")
    engine.export_kv("h")
    engine.export_kv("h")

    # Execute / Assert: pinned until every export is released.
    engine.release_export("h")
    assert engine.kv.compact() == 0 and engine._get("h").kv_start == 20
    engine.release_export("h")
    with pytest.raises(EngineError, match="has no outstanding export"):
        engine.release_export("h")
    assert engine.kv.compact() == 40 and engine._get("h").kv_start == 0
    assert torch.equal(_rows(engine, "h"), kv_before)
    engine.resume("h")
    assert oracle.run(engine) == {"h": oracle.greedy(prompt, 11)}


def test_importing_range_is_pinned_until_finish_import(oracle: Oracle) -> None:
    # Prepare: the source prefills r. The receiver: s [0,15) h [15,25) r [25,60) importing,
    # g [60,80) u [80,95) free [95,100); then h and g leave (35 rows free, largest extent 20).
    source = oracle.engine()
    sizes = {"s": (10, 6), "h": (5, 6), "r": (25, 11), "g": (10, 11), "u": (10, 6), "t": (15, 11)}
    prompts = {rid: oracle.prompt(230 + i, n) for i, (rid, (n, _)) in enumerate(sizes.items())}
    params = {rid: SamplingParams(max_new_tokens=new) for rid, (_, new) in sizes.items()}
    source.add_request("r", prompts["r"], params["r"], hold_after_prefill=True)
    source.step()
    export = source.export_kv("r")
    target = oracle.engine(kv_tokens=100)
    for rid in "sh":
        target.add_request(rid, prompts[rid], params[rid])
    dest = target.begin_import(export.metadata)
    for rid in "gu":
        target.add_request(rid, prompts[rid], params[rid])
    target.step()  # s, h, g, u prefill; r is not scheduled while importing
    target.cancel("h")
    target.cancel("g")

    # Execute: t (25 rows) fits only after u slides down past the pinned, importing r.
    target.add_request("t", prompts["t"], params["t"])
    starts_importing = {rid: target._get(rid).kv_start for rid in "srut"}
    for view, src in zip(dest.keys + dest.values, export.keys + export.values, strict=True):
        view.copy_(src)  # the views handed out before the compaction are still r's rows
    target.finish_import("r")
    target.kv.compact()  # unpinned now: r moves too
    starts_after = {rid: target._get(rid).kv_start for rid in "srut"}
    outputs = oracle.run(target)

    # Assert
    assert starts_importing == {"s": 0, "r": 25, "u": 60, "t": 75}
    assert starts_after == {"s": 0, "r": 15, "u": 50, "t": 65}
    assert outputs == {rid: oracle.greedy(prompts[rid], sizes[rid][1]) for rid in "srut"}


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([1, 3, 256]),
    st.lists(
        st.tuples(
            st.sampled_from(["movable", "movable", "fixed", "free", "free", "pin", "unpin"]),
            st.integers(1, 24),
            st.integers(0, 1000),
        ),
        max_size=50,
    ),
)
def test_compaction_preserves_content_never_overlaps_and_accounts_exactly(
    stage_tokens: int, ops: list[tuple[str, int, int]]
) -> None:
    # Prepare: a 64-row pool of 2 layers; every range is filled with its own random rows.
    kv = KVCache(
        num_layers=2,
        num_kv_heads=2,
        head_dim=3,
        pool_tokens=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    kv.stage_tokens = stage_tokens
    gen = torch.Generator().manual_seed(0)
    movable: list[KVRange] = []
    fixed: dict[int, int] = {}  # start -> size
    content: dict[int, torch.Tensor] = {}  # id(range) or -start for fixed -> its rows

    def rows(start: int, size: int) -> torch.Tensor:
        return kv.pool[:, :, start : start + size]

    # Execute / Assert after every op.
    for op, size, pick in ops:
        if op in ("movable", "fixed"):
            fits = kv.can_fit(size)
            pinned_or_fixed = any(r.pins for r in movable) or bool(fixed)
            try:
                if op == "movable":
                    rng = kv.reserve_movable("m", size)
                    movable.append(rng)
                    key, start = id(rng), rng.start
                else:
                    start = kv.reserve("f", size)
                    fixed[start] = size
                    key = -start - 1
            except EngineError:
                assert not fits
                if not pinned_or_fixed:
                    assert kv.allocator.num_free_tokens < size
                continue
            assert fits
            content[key] = torch.randn(rows(start, size).shape, generator=gen)
            rows(start, size).copy_(content[key])
        elif op == "free" and (movable or fixed):
            everything = [(r.start, id(r)) for r in movable] + [(s, -s - 1) for s in fixed]
            start, key = everything[pick % len(everything)]
            kv.release(start)
            del content[key]
            movable = [r for r in movable if id(r) != key]
            fixed.pop(start, None)
        elif op == "pin" and movable:
            movable[pick % len(movable)].pins += 1
        elif op == "unpin" and any(r.pins for r in movable):
            pinned = [r for r in movable if r.pins]
            pinned[pick % len(pinned)].pins -= 1
        pinned_before = {id(r): r.start for r in movable if r.pins}
        if pick % 4 == 0:
            kv.compact()
        live = sorted([(r.start, r.num_tokens) for r in movable] + list(fixed.items()))
        assert all(a + n <= b for (a, n), (b, _) in zip(live, live[1:], strict=False)), live
        assert all(0 <= a and a + n <= 64 for a, n in live)
        assert kv.allocator.used_ranges() == live
        assert kv.allocator.num_free_tokens == 64 - sum(n for _, n in live)
        assert sum(kv.allocator._free_sizes.values()) == kv.allocator.num_free_tokens
        assert {id(r): r.start for r in movable if r.pins} == pinned_before
        for r in movable:
            assert torch.equal(rows(r.start, r.num_tokens), content[id(r)])
        for start, size in fixed.items():
            assert torch.equal(rows(start, size), content[-start - 1])
    if not fixed and not any(r.pins for r in movable):
        kv.compact()
        assert kv.allocator.largest_free_tokens == kv.allocator.num_free_tokens


def test_overlapping_moves_of_every_block_shape_copy_exactly() -> None:
    # Prepare: one 50-row range behind gaps of 1, 7 and 20 rows, block sizes 1, 4 and 256.
    for gap in (1, 7, 20):
        for stage_tokens in (1, 4, 256):
            kv = KVCache(
                num_layers=3,
                num_kv_heads=1,
                head_dim=2,
                pool_tokens=80,
                dtype=torch.float32,
                device=torch.device("cpu"),
            )
            kv.stage_tokens = stage_tokens
            hole = kv.reserve_movable("hole", gap)
            rng = kv.reserve_movable("r", 50)
            want = torch.randn(kv.pool[:, :, rng.start : rng.start + 50].shape)
            kv.pool[:, :, rng.start : rng.start + 50].copy_(want)
            kv.release(hole.start)

            # Execute
            moved = kv.compact()

            # Assert
            assert moved == 50 and rng.start == 0, (gap, stage_tokens)
            assert torch.equal(kv.pool[:, :, :50], want), (gap, stage_tokens)


def test_an_import_reserved_before_its_token_ids_decodes_as_in_place(oracle: Oracle) -> None:
    # Prepare: the source prefills r and exports it; the receiver reserves from the counts
    prompt = oracle.prompt(301, 40)
    params = SamplingParams(max_new_tokens=9)
    source = oracle.engine()
    source.add_request("r", prompt, params, hold_after_prefill=True)
    source.step()
    export = source.export_kv("r")
    meta = export.metadata
    header = dataclasses.replace(meta, prompt_token_ids=(), output_token_ids=())
    counts = (len(meta.prompt_token_ids), len(meta.output_token_ids))
    target = oracle.engine(kv_tokens=100)

    # Execute: rows first, filled before the ids arrive; wrong or missing ids are refused
    dest = target.reserve_import(header, *counts)
    for view, src in zip(dest.keys + dest.values, export.keys + export.values, strict=True):
        view.copy_(src)
    with pytest.raises(EngineError) as before_ids:
        target.finish_import("r")
    with pytest.raises(EngineError) as short_prompt:
        target.attach_import(dataclasses.replace(meta, prompt_token_ids=meta.prompt_token_ids[1:]))
    target.attach_import(meta)
    with pytest.raises(EngineError) as twice:
        target.attach_import(meta)
    target.finish_import("r")
    outputs = oracle.run(target)
    refused = oracle.engine(kv_tokens=100)
    refused.reserve_import(header, *counts)
    with pytest.raises(EngineError) as bad_id:
        refused.attach_import(dataclasses.replace(meta, prompt_token_ids=(10**6,) * counts[0]))
    refused.cancel("r")

    # Assert
    assert outputs == {"r": oracle.greedy(prompt, 9)}
    assert before_ids.value.code is EngineErrorCode.INVALID_STATE
    assert short_prompt.value.code is EngineErrorCode.INVALID_ARGUMENT
    assert twice.value.code is EngineErrorCode.INVALID_STATE
    assert bad_id.value.code is EngineErrorCode.INVALID_ARGUMENT
    assert refused.num_free_kv_tokens == 100
