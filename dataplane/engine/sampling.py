"""Token selection: greedy for the whole batch at once, seeded temperature/top-p per request."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dataplane.engine.types import SamplingParams


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of logits (N, vocab) float32; one host sync for the whole batch."""
    chosen = logits.argmax(dim=-1)  # (N,)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.is_greedy:
            chosen[row] = _sample_row(logits[row], p, gen)
    tokens: list[int] = chosen.tolist()
    return tokens


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> torch.Tensor:
    """Sample from softmax(logits / temperature) restricted to the top-p nucleus."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs[before >= params.top_p] = 0.0  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen)[0]
