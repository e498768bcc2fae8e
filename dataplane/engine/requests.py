"""The engine's mutable per-request record and its states (engine-internal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from dataplane.engine.kv_cache import KVRange
from dataplane.engine.types import SamplingParams


class RequestState(Enum):
    """Where a resident request is in its life cycle (see `dataplane.engine.engine`)."""

    PREFILLING = "prefilling"  # prompt chunks left; scheduled by step()
    DECODING = "decoding"  # one token per step
    PAUSED = "paused"  # not scheduled, KV resident; resume() returns to `paused_from`
    HELD = "held"  # prefill done with hold_after_prefill: waits for export or resume()
    IMPORTING = "importing"  # rows reserved, KV being filled by begin_import's caller


@dataclass(slots=True)
class RunningRequest:
    """Mutable state of one resident request; only the engine touches it."""

    request_id: str
    prompt_token_ids: list[int]  # the prompt
    prompt_tensor: torch.Tensor  # (prompt,) int64 on CPU, sliced into prefill chunks
    sampling: SamplingParams
    generator: torch.Generator | None  # per-request RNG for sampled requests
    kv_range: KVRange  # the pool rows owned (prompt + max_new_tokens - 1); compaction moves it
    chunk_tokens: int  # prefill chunk size
    hold_after_prefill: bool  # stop in HELD after the first token
    state: RequestState
    batch_tokens: int | None = None  # while it prefills: tokens per iteration at most, in all
    num_computed_tokens: int = 0  # token positions with KV written
    paused_from: RequestState | None = None  # state to return to on resume
    output_token_ids: list[int] = field(default_factory=list)  # generated tokens

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        kv_range: KVRange,
        chunk_tokens: int,
        hold_after_prefill: bool,
        device: torch.device,
        batch_tokens: int | None = None,
    ) -> RunningRequest:
        """A freshly admitted request in PREFILLING with no KV written yet."""
        generator = None
        if not sampling.is_greedy:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        return cls(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            prompt_tensor=torch.tensor(prompt_token_ids, dtype=torch.int64),
            sampling=sampling,
            generator=generator,
            kv_range=kv_range,
            chunk_tokens=chunk_tokens,
            hold_after_prefill=hold_after_prefill,
            state=RequestState.PREFILLING,
            batch_tokens=batch_tokens,
        )

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def kv_start(self) -> int:
        """First pool row owned by the request (read it per step: compaction may move it)."""
        return self.kv_range.start

    @property
    def kv_rows(self) -> int:
        """Pool rows owned."""
        return self.kv_range.num_tokens
