"""Engine greedy output equals transformers' generate: one-shot, chunked, paused, mixed batches."""

from __future__ import annotations

import pytest
from conftest import Oracle

from dataplane.engine.requests import RequestState
from dataplane.engine.types import (
    ChunkDone,
    EngineEvent,
    Finished,
    FinishReason,
    PrefillDone,
    SamplingParams,
    TokenGenerated,
)

NEW_TOKENS = 16


def test_one_shot_prefill_equals_transformers(oracle: Oracle) -> None:
    # Prepare
    prompt = oracle.prompt(10, 60)
    want = oracle.greedy(prompt, NEW_TOKENS)
    oracle.assert_varied(want)
    engine = oracle.engine(chunk_tokens=1024, max_batch_tokens=1024)
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
    events: list[EngineEvent] = []

    # Execute
    outputs = oracle.run(engine, lambda _, step_events: events.extend(step_events))

    # Assert
    assert outputs["a"] == want
    assert events[:3] == [
        ChunkDone("a", 60, 60, 60),
        PrefillDone("a", 60),
        TokenGenerated("a", want[0], 1),
    ]
    assert events[-1] == Finished("a", FinishReason.LENGTH, tuple(want))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 32])
def test_chunked_prefill_equals_transformers(oracle: Oracle, chunk_tokens: int) -> None:
    # Prepare
    prompt = oracle.prompt(11, 45)
    want = oracle.greedy(prompt, NEW_TOKENS)
    oracle.assert_varied(want)
    engine = oracle.engine(chunk_tokens=chunk_tokens)
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
    chunks: list[int] = []

    # Execute
    outputs = oracle.run(
        engine,
        lambda _, evs: chunks.extend(e.num_chunk_tokens for e in evs if isinstance(e, ChunkDone)),
    )

    # Assert
    assert outputs["a"] == want
    assert chunks == [min(chunk_tokens, 45 - i) for i in range(0, 45, chunk_tokens)]


def test_paused_prefill_resumes_from_its_last_chunk(oracle: Oracle) -> None:
    # Prepare: a long prompt is paused after two chunks while a short one runs to the end.
    long_prompt, short_prompt = oracle.prompt(12, 80), oracle.prompt(13, 9)
    want_long, want_short = oracle.greedy(long_prompt, NEW_TOKENS), oracle.greedy(short_prompt, 6)
    oracle.assert_varied(want_long)
    engine = oracle.engine(chunk_tokens=16, max_batch_tokens=16)
    engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
    prefilled: list[int] = []

    # Execute
    for _ in range(2):
        prefilled += [e.num_chunk_tokens for e in engine.step() if isinstance(e, ChunkDone)]
    engine.pause("long")
    engine.add_request("short", short_prompt, SamplingParams(max_new_tokens=6))
    short_out = oracle.run(engine)
    state_while_paused = engine.request_state("long")
    engine.resume("long", chunk_tokens=12)
    long_out = oracle.run(
        engine,
        lambda _, evs: prefilled.extend(
            e.num_chunk_tokens for e in evs if isinstance(e, ChunkDone)
        ),
    )

    # Assert: nothing recomputed (the chunks sum to the prompt), tokens equal the reference.
    assert state_while_paused is RequestState.PAUSED
    assert short_out == {"short": want_short}
    assert long_out == {"long": want_long}
    assert prefilled == [16, 16, 12, 12, 12, 12] and sum(prefilled) == 80


def test_requests_in_mixed_batches_at_different_lengths_equal_transformers(oracle: Oracle) -> None:
    # Prepare: requests arrive while others decode, so steps mix decodes and prefill chunks.
    lengths = [5, 70, 23, 41, 1]
    prompts = [oracle.prompt(20 + i, n) for i, n in enumerate(lengths)]
    wants = [oracle.greedy(p, NEW_TOKENS) for p in prompts]
    for want in wants[:4]:
        oracle.assert_varied(want)
    engine = oracle.engine(chunk_tokens=16, max_batch_tokens=24)
    arrivals = {0: [0, 1], 3: [2], 5: [3, 4]}
    mixed_steps: list[int] = []

    def on_step(step: int, events: list[EngineEvent]) -> None:
        kinds = {type(e) for e in events}
        decoded = {e.request_id for e in events if isinstance(e, TokenGenerated)}
        chunked = {e.request_id for e in events if isinstance(e, ChunkDone)}
        if ChunkDone in kinds and decoded - chunked:
            mixed_steps.append(step)
        for idx in arrivals.get(step + 1, []):
            engine.add_request(f"r{idx}", prompts[idx], SamplingParams(max_new_tokens=NEW_TOKENS))

    for idx in arrivals[0]:
        engine.add_request(f"r{idx}", prompts[idx], SamplingParams(max_new_tokens=NEW_TOKENS))

    # Execute
    outputs = oracle.run(engine, on_step)

    # Assert
    assert mixed_steps, "no step mixed decode tokens with prefill chunks"
    assert outputs == {f"r{i}": wants[i] for i in range(len(lengths))}


def test_a_mixed_prefills_batch_tokens_bound_every_iteration_it_runs_in(oracle: Oracle) -> None:
    # Prepare: an engine of 64 tokens per iteration; a decode, then a long and a short prompt
    # admitted with a 20-token budget (sarathi's): decodes first, then chunks in admission order.
    prompts = {
        "d": oracle.prompt(60, 5),
        "long": oracle.prompt(61, 70),
        "short": oracle.prompt(62, 9),
    }
    wants = {rid: oracle.greedy(p, NEW_TOKENS) for rid, p in prompts.items()}
    engine = oracle.engine(chunk_tokens=64, max_batch_tokens=64)
    engine.add_request("d", prompts["d"], SamplingParams(max_new_tokens=NEW_TOKENS))
    engine.step()
    for rid, chunk in (("long", 12), ("short", 64)):
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
        engine.add_request(rid, prompts[rid], sampling, chunk_tokens=chunk, batch_tokens=20)
    steps: list[tuple[int, dict[str, int]]] = []  # (iteration tokens, chunk tokens by request)

    def on_step(_: int, events: list[EngineEvent]) -> None:
        chunks = {e.request_id: e.num_chunk_tokens for e in events if isinstance(e, ChunkDone)}
        steps.append((engine.last_iteration_tokens, chunks))

    # Execute
    outputs = oracle.run(engine, on_step)

    # Assert: 1 decode + 12 (long's chunk) + 7 of the short (the budget's rest), then the rest.
    assert outputs == wants
    assert steps[0] == (20, {"long": 12, "short": 7})
    assert steps[1] == (15, {"long": 12, "short": 2})  # the decode, a chunk, the short's rest
    prefilling = [tokens for tokens, chunks in steps if chunks]
    assert max(prefilling) <= 20 and sum(c.get("long", 0) for _, c in steps) == 70
    assert engine.num_iterations == 1 + len(steps)


def test_eos_stops_a_request_and_frees_its_kv(oracle: Oracle) -> None:
    # Prepare: make the reference's 4th token the end-of-sequence token.
    prompt = oracle.prompt(30, 12)
    want = oracle.greedy(prompt, NEW_TOKENS)
    eos = want[3]
    stop = want.index(eos) + 1
    engine = oracle.engine()
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,)))

    # Execute
    finished: list[Finished] = []
    oracle.run(engine, lambda _, evs: finished.extend(e for e in evs if isinstance(e, Finished)))

    # Assert
    assert finished == [Finished("a", FinishReason.EOS, tuple(want[:stop]))]
    assert engine.num_free_kv_tokens == 4096 and engine.num_requests == 0


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy(oracle: Oracle) -> None:
    # Prepare
    prompt = oracle.prompt(31, 20)
    want_greedy = oracle.greedy(prompt, NEW_TOKENS)
    engine = oracle.engine()
    hot = {"temperature": 1.5, "max_new_tokens": NEW_TOKENS}
    engine.add_request("s1", prompt, SamplingParams(seed=5, **hot))
    engine.add_request("s2", prompt, SamplingParams(seed=5, **hot))
    engine.add_request("s3", prompt, SamplingParams(seed=6, **hot))
    engine.add_request("nucleus", prompt, SamplingParams(seed=7, top_p=1e-6, **hot))

    # Execute
    outputs = oracle.run(engine)

    # Assert
    assert outputs["s1"] == outputs["s2"]
    assert outputs["s1"] != outputs["s3"]
    assert outputs["nucleus"] == want_greedy


def test_long_prompt_of_5000_tokens_in_chunks_equals_transformers(
    oracles: dict[str, Oracle],
) -> None:
    # Prepare
    oracle = oracles["tiny"]
    prompt = oracle.prompt(40, 5000)
    want = oracle.greedy(prompt, 8)
    oracle.assert_varied(want)
    engine = oracle.engine(kv_tokens=5100, chunk_tokens=1024, max_batch_tokens=1024)
    engine.add_request("long", prompt, SamplingParams(max_new_tokens=8))

    # Execute
    outputs = oracle.run(engine)

    # Assert
    assert outputs == {"long": want}


def test_decodes_beyond_the_batch_limit_take_turns_and_stay_correct(oracle: Oracle) -> None:
    # Prepare: three decoding requests, two sequences per iteration.
    prompts = [oracle.prompt(50 + i, 6 + i) for i in range(3)]
    wants = [oracle.greedy(p, 8) for p in prompts]
    engine = oracle.engine(max_batch_seqs=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=8))
    engine.step()  # prefills r0 and r1 (two sequences per iteration)
    engine.pause("r0")
    engine.pause("r1")
    engine.step()  # prefills r2
    engine.resume("r0")
    engine.resume("r1")
    per_step: list[set[str]] = []

    # Execute
    outputs = oracle.run(
        engine,
        lambda _, evs: per_step.append(
            {e.request_id for e in evs if isinstance(e, TokenGenerated)}
        ),
    )

    # Assert: three decode with two slots, so each skips at most one step in a row.
    assert outputs == {f"r{i}": wants[i] for i in range(3)}
    assert {len(tokens) for tokens in per_step[:6]} == {2}
    assert all(len(tokens) <= 2 for tokens in per_step)
    for rid in outputs:
        steps = [i for i, ids in enumerate(per_step) if rid in ids]
        assert max(b - a for a, b in zip(steps, steps[1:], strict=False)) <= 2, (rid, steps)
