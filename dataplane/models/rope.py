"""Rotary position embedding (RoPE) with the scalings Llama-family configs use.

`rope_inverse_frequencies(config)` reads the theta and scaling from a `transformers` config
(both the 4.x fields `rope_theta` + `rope_scaling` and the 5.x `rope_parameters` dict) and
returns the per-pair inverse frequencies. `rope_cos_sin(positions, inv_freq, dtype)` turns
explicit position ids into the cos/sin tables, so any slice of a sequence can be processed at
any offset (chunked prefill, sequence-parallel shards, decode). Supported scalings: `default`,
`linear` and `llama3`; any other type is refused with an error naming it, because a silently
wrong RoPE produces plausible-looking garbage.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(config: Any) -> tuple[float, dict[str, Any]]:
    """Return (theta, scaling dict with at least `rope_type`) from a transformers config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params)
        theta = float(scaling.pop("rope_theta"))
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    return theta, scaling


def rope_inverse_frequencies(config: Any, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, shape (head_dim // 2,), float32 on CPU, with the config's scaling."""
    theta, scaling = rope_settings(config)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context_tokens = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original_context_tokens / low_freq_factor
    high_freq_wavelen = original_context_tokens / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context_tokens / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for explicit positions: (T,) int64 -> two (T, head_dim) in `dtype`."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (T, heads, head_dim) by per-token (T, head_dim) tables (half-split convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
