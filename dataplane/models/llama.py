"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in plain PyTorch, built from an HF config.

The q/k/v projections are one `FusedLinear` (`qkv_proj`) and so are the MLP's gate/up
(`gate_up_proj`): one GEMM each instead of three and two. `hf_parameters(model)` names every
parameter (or row block of a fused one) as `transformers` does
(`model.layers.0.self_attn.q_proj.weight`, ...): loading, seeded init and export go through it,
so HF directories load and export unchanged. The forward works on a flat token dimension::

    logits = model(input_ids, positions, attend, logits_indices)
        input_ids:      (T,) int64   new tokens of one or more sequences, concatenated
        positions:      (T,) int64   absolute position of each token in its sequence (RoPE)
        attend:         Attend       the attention step (see `dataplane.models.attention`)
        logits_indices: (N,) int64   rows of T whose logits are wanted (None: all T)
        returns         (N, vocab) float32

Per layer the attention block computes q, k, v, applies RoPE at `positions`, and hands them to
`attend(layer_idx, q, k, v)`, which owns the KV cache and the kernel. Everything else (norms,
projections, MLP) is per token, so a worker may run any shard of a sequence at any offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataplane.models.attention import Attend
from dataplane.models.fused import add_rms_norm, rope_qk
from dataplane.models.rope import rope_cos_sin, rope_inverse_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of an HF config that the decoder and the KV cache need."""

    model_type: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int  # embedding rows
    hidden_size: int  # residual width
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # decoder layers
    num_q_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than query heads)
    head_dim: int  # per-head width
    rms_norm_eps: float  # RMSNorm epsilon
    qkv_bias: bool  # q/k/v projections have a bias (Qwen2, Llama attention_bias)
    o_bias: bool  # output projection has a bias (Llama attention_bias)
    mlp_bias: bool  # MLP projections have a bias (Llama mlp_bias)
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    max_position_tokens: int  # config.max_position_embeddings
    sliding_window_tokens: int | None  # active sliding window (requests longer are refused)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read and validate the fields of a LlamaConfig / MistralConfig / Qwen2Config."""
        model_type = str(getattr(config, "model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.model_type={model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.hidden_act={act!r} is not supported (only 'silu')")
        num_q_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_q_heads)
        if num_q_heads % num_kv_heads:
            raise ValueError("config.num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.rms_norm_eps),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_tokens=int(config.max_position_embeddings),
            sliding_window_tokens=int(window) if window else None,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V over all layers for one token."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * item

    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_q_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as transformers does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dim of x and scale by the weight; returns x's dtype.

        float32 follows transformers' formula op for op; half precisions use the fused kernel
        (it also accumulates in float32, rounding once instead of twice).
        """
        if x.dtype != torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class FusedLinear(nn.Linear):
    """Several linear layers over the same input as one: their weights stacked by rows.

    `parts` names each stacked layer (its HF module name) with its output width, in row order.
    The output is the parts' outputs concatenated on the last dim.
    """

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool) -> None:
        super().__init__(in_features, sum(width for _, width in parts), bias=bias)
        self.parts = parts

    def part_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF-relative name, row-block view) per part, weight then bias, in HF order."""
        first = 0
        for name, width in self.parts:
            yield f"{name}.weight", self.weight[first : first + width]
            if self.bias is not None:
                yield f"{name}.bias", self.bias[first : first + width]
            first += width


def hf_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter under its `transformers` name, in module order; a fused parameter
    yields one row-block view per part. Tied parameters are yielded once (the first name)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        parent = prefix.rpartition(".")[0]
        if isinstance(module, FusedLinear):
            for name, view in module.part_parameters():
                yield f"{parent}.{name}" if parent else name, view
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{prefix}.{name}" if prefix else name, param


class SelfAttention(nn.Module):
    """Fused q/k/v projection + RoPE, the swappable `attend` step, and the output projection."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.num_q_heads, self.num_kv_heads, self.head_dim = (
            shape.num_q_heads,
            shape.num_kv_heads,
            d,
        )
        self.qkv_widths = [shape.num_q_heads * d, shape.num_kv_heads * d, shape.num_kv_heads * d]
        parts = tuple(zip(("q_proj", "k_proj", "v_proj"), self.qkv_widths, strict=True))
        self.qkv_proj = FusedLinear(h, parts, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(shape.num_q_heads * d, h, bias=shape.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
        layer_idx: int,
    ) -> torch.Tensor:
        """x (T, hidden) -> (T, hidden); attention itself is `attend`'s business."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_widths, dim=-1)  # row-strided views
        q = q.view(num_tokens, self.num_q_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = rope_qk(q, k, cos, sin)  # on CUDA in place: q, k are views of a fresh output
        out = attend(layer_idx, q, k, v)  # (T, Hq, D)
        projected: torch.Tensor = self.o_proj(out.reshape(num_tokens, -1))  # (T, hidden)
        return projected


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one fused GEMM."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        h, i = shape.hidden_size, shape.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = FusedLinear(h, (("gate_proj", i), ("up_proj", i)), bias=shape.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=shape.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> (T, hidden)."""
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = SelfAttention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
        layer_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried as a pair whose sum it is: (x, residual), both
        (T, hidden); the first layer gets (embeddings, None). Returns the pair for the next
        layer: (MLP output, stream before it). Each add is fused with the norm that follows."""
        if residual is None:
            residual = x
            normed = self.input_layernorm(x)
        else:
            normed, residual = add_rms_norm(x, residual, self.input_layernorm)
        attn = self.self_attn(normed, cos, sin, attend, layer_idx)
        normed, residual = add_rms_norm(attn, residual, self.post_attention_layernorm)
        return self.mlp(normed), residual


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (transformers' `model.*` submodule)."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus lm_head; see the module docstring for the forward contract."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.shape = ModelShape.from_config(config)
        self.model = DecoderStack(self.shape)
        self.lm_head = nn.Linear(self.shape.hidden_size, self.shape.vocab_size, bias=False)
        # Kept out of the module's buffers so `.to(bfloat16)` never rounds the frequencies.
        self._inv_freq_cpu = rope_inverse_frequencies(config, self.shape.head_dim)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix when the config asks for it."""
        if self.shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (N, vocab) float32 for the rows `logits_indices` of the T new tokens."""
        hidden = self.model.embed_tokens(input_ids)  # (T, hidden)
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_cpu.to(positions.device)
            self._inv_freq[positions.device] = inv_freq
        cos, sin = rope_cos_sin(positions, inv_freq, hidden.dtype)  # (T, D) each
        residual = None
        for layer_idx, layer in enumerate(self.model.layers):
            hidden, residual = layer(hidden, residual, cos, sin, attend, layer_idx)
        assert residual is not None, "a decoder has at least one layer"
        if logits_indices is not None:  # (N, hidden): skip the norm/head for other rows
            hidden, residual = hidden[logits_indices], residual[logits_indices]
        normed, _ = add_rms_norm(hidden, residual, self.model.norm)
        logits: torch.Tensor = self.lm_head(normed)
        return logits.float()
