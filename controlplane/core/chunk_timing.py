"""`ChunkTimeEstimator`: the chunk token budget that makes a long prefill's chunks take a
target time, learned from the chunk times the data plane reports.

A short that preempts a long prefill waits for the victim's chunk in flight to end, so what
bounds that wait is a chunk's time, not its token count: the same chunk runs ~1.4x longer on
Llama-3.1-70B (TP4) than on Mistral-7B (TP1). A chunk's time is dominated, at 100K+ tokens, by
its attention work per instance, `chunk x context / sp_degree` token pairs, so the estimate is
seconds per pair: an exponentially weighted ratio of means (the chunks' seconds over their
pairs, each chunk's context taken at its end), so deep chunks, whose time is nearly all
attention, weigh most. One estimate per instance class (`ChunkClass`: the GPUs and KV of an
instance, i.e. one model on one kind of replica). The budget in token pairs is then
`target_s / seconds per pair`: the chunk of that budget at a prompt's end, its longest, takes
about `target_s`. Before a class's first observation the configured budget is the prior.

The core has no clock and no cost model: observations come from `PrefillChunkDone` events (the
simulator's cost model or a live engine's measured times), so the rule is the same live and in
the simulator, and deterministic for the same events.
"""

from __future__ import annotations

import math
from typing import NamedTuple

SAMPLE_WEIGHT = 0.05  # weight of each new chunk in the running sums (~20 recent chunks)


class ChunkClass(NamedTuple):
    """Instances whose chunks take the same time: GPUs per replica and KV capacity."""

    tp: int
    kv_capacity_tokens: int


class ChunkTimeEstimator:
    """Seconds per attention token pair per instance, learned per `ChunkClass`."""

    def __init__(self, target_s: float, prior_budget_pairs: int) -> None:
        if not target_s > 0.0 or not math.isfinite(target_s):
            raise ValueError(f"target_s must be a positive number, got {target_s}")
        if prior_budget_pairs < 1:
            raise ValueError(f"prior_budget_pairs must be >= 1, got {prior_budget_pairs}")
        self._target_s = target_s
        self._prior = prior_budget_pairs
        # class -> running means of (seconds, pairs per instance) over its chunks
        self._means: dict[ChunkClass, tuple[float, float]] = {}

    def chunk_ran(
        self,
        cls: ChunkClass,
        seconds: float,
        chunk_tokens: int,
        context_end_tokens: int,
        sp_degree: int,
    ) -> None:
        """A chunk of `chunk_tokens` ending at prompt position `context_end_tokens` ran on
        `sp_degree` instances of `cls` in `seconds`. Ill-formed samples (no tokens, negative or
        non-finite time) are ignored: they carry no timing."""
        if chunk_tokens < 1 or sp_degree < 1 or not (math.isfinite(seconds) and seconds >= 0.0):
            return
        pairs = chunk_tokens * max(chunk_tokens, context_end_tokens) / sp_degree
        old = self._means.get(cls)
        if old is None:
            self._means[cls] = (seconds, pairs)
        else:
            self._means[cls] = (
                old[0] + SAMPLE_WEIGHT * (seconds - old[0]),
                old[1] + SAMPLE_WEIGHT * (pairs - old[1]),
            )

    def seconds_per_pair(self, cls: ChunkClass) -> float | None:
        """Learned seconds per token pair per instance of `cls` (None before a sample)."""
        means = self._means.get(cls)
        if means is None or means[0] <= 0.0:
            return None
        return means[0] / means[1]

    def budget_pairs(self, cls: ChunkClass) -> int:
        """Token pairs per instance a chunk of `cls` may hold to take about `target_s` at its
        prompt's end; the prior before `cls` was observed."""
        per_pair = self.seconds_per_pair(cls)
        if per_pair is None:
            return self._prior
        return max(1, math.floor(self._target_s / per_pair))

    def prefill_chunk_ran(
        self,
        cls: ChunkClass,
        seconds: float,
        prompt_tokens: int,
        chunks_total: int,
        chunk_index: int,
        sp_degree: int,
    ) -> None:
        """Chunk `chunk_index` (0-based) of a prefill of `prompt_tokens` in `chunks_total`
        equal chunks (the last one shorter) ran in `seconds`: `chunk_ran` with its size and
        end."""
        if chunks_total < 1 or not 0 <= chunk_index < chunks_total:
            return
        chunk = -(-prompt_tokens // chunks_total)
        end = min(prompt_tokens, (chunk_index + 1) * chunk)
        self.chunk_ran(cls, seconds, end - chunk_index * chunk, end, sp_degree)
