"""Values the engine takes and returns: sampling parameters, step events, KV export records."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    max_new_tokens: int  # stop after this many generated tokens (>= 1)
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples from softmax(logits / t)
    top_p: float = 1.0  # nucleus: sample from the smallest set with this much probability
    seed: int = 0  # seed of the request's own torch.Generator (used when temperature > 0)
    eos_token_ids: tuple[int, ...] = ()  # generating one of these finishes the request

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        """True when tokens are the argmax."""
        return self.temperature == 0


class FinishReason(StrEnum):
    """Why a request stopped."""

    LENGTH = "length"  # max_new_tokens generated
    EOS = "eos"  # an end-of-sequence token was generated (it is the last output token)


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """A prefill chunk of a request ran in this step."""

    request_id: str
    num_chunk_tokens: int  # prompt tokens computed in this step
    num_prefilled_tokens: int  # prompt tokens with KV resident after this step
    num_prompt_tokens: int  # prompt length


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The whole prompt has KV resident; the first output token follows as TokenGenerated."""

    request_id: str
    num_prompt_tokens: int  # prompt length


@dataclass(frozen=True, slots=True)
class TokenGenerated:
    """One output token was sampled."""

    request_id: str
    token_id: int  # the token
    num_output_tokens: int  # output length including this token


@dataclass(frozen=True, slots=True)
class Finished:
    """The request stopped; its KV has been freed."""

    request_id: str
    reason: FinishReason
    output_token_ids: tuple[int, ...]  # every generated token, in order


EngineEvent = ChunkDone | PrefillDone | TokenGenerated | Finished


@dataclass(frozen=True, slots=True)
class KVMetadata:
    """What a peer needs, besides the tensors, to continue a request where it stopped."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # the full prompt
    output_token_ids: tuple[int, ...]  # tokens generated so far (the last one has no KV yet)
    num_kv_tokens: int  # token positions [0, num_kv_tokens) have KV in the tensors
    num_layers: int  # layout check: decoder layers
    num_kv_heads: int  # layout check: KV heads per layer
    head_dim: int  # layout check: per-head width
    dtype: str  # layout check: e.g. "torch.bfloat16"
    sampling: SamplingParams  # the request's sampling parameters
    generator_state: bytes | None  # the request generator's state (sampled requests only)


@dataclass(frozen=True, slots=True)
class KVExport:
    """A request's KV: per-layer tensors of shape (num_kv_tokens, Hkv, D) plus metadata.

    The tensors are views into the exporting engine's pool, valid until the request is
    cancelled or finishes there: send or copy them first.
    """

    metadata: KVMetadata
    keys: tuple[torch.Tensor, ...]  # per layer: (num_kv_tokens, Hkv, D)
    values: tuple[torch.Tensor, ...]  # per layer: (num_kv_tokens, Hkv, D)


@dataclass(frozen=True, slots=True)
class KVImportTarget:
    """Per-layer (num_kv_tokens, Hkv, D) views of the rows reserved for an incoming request."""

    request_id: str
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
