"""Engine configuration and the memory reserve it implies."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from dataplane.models.llama import ModelShape


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Limits of one engine."""

    max_batch_tokens: int = 2048  # tokens per iteration: decodes + prefill chunks
    max_batch_seqs: int = 256  # sequences per iteration
    chunk_tokens: int = 512  # default prefill chunk size (a request may override it)
    kv_budget_bytes: int | None = None  # KV pool size; None: from free CUDA memory
    memory_fraction: float = 0.92  # share of device memory the process may use (CUDA)
    max_model_tokens: int | None = None  # longest prompt + output; None: the model's limit
    cuda_graphs: bool = True  # capture decode-only steps (flash or split-KV decode kernel only)
    attention_kernel: str = "auto"  # "auto" (probe flash varlen), "flash-varlen" or "sdpa"
    split_kv_decode: bool = True  # decodes by the Triton split-KV kernel where it runs (probed)

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_seqs", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_kernel not in ("auto", "flash-varlen", "sdpa"):
            raise ValueError(
                f"attention_kernel must be auto|flash-varlen|sdpa, got {self.attention_kernel!r}"
            )
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


class AttentionKernel(Enum):
    """Which attention kernels the engine uses (probed once at construction)."""

    FLASH_VARLEN = "flash-varlen"
    SDPA = "sdpa"


def activation_reserve_bytes(shape: ModelShape, config: EngineConfig, dtype: torch.dtype) -> int:
    """Upper estimate of one iteration's transient memory at the configured token budget.

    Per token: residual/normed/attention/MLP activations in `dtype` plus float32 norm
    temporaries; per sequence: float32 logits and sampling copies; plus 512 MiB for kernel
    workspaces, CUDA graph pools and allocator slack.
    """
    item = torch.empty((), dtype=dtype).element_size()
    qkv = (shape.num_q_heads + 2 * shape.num_kv_heads) * shape.head_dim
    per_token = (8 * shape.hidden_size + 3 * qkv + 4 * shape.intermediate_size) * item
    per_token += 3 * shape.hidden_size * 4  # float32 RMSNorm temporaries
    logits = 3 * min(config.max_batch_seqs, config.max_batch_tokens) * shape.vocab_size * 4
    return config.max_batch_tokens * per_token + logits + (512 << 20)
