"""Named model shapes as `transformers` configs, with the init range that makes them talk.

Random weights are the only weights available offline. With transformers' default
`initializer_range` (0.02) a small random decoder's greedy output collapses to one repeated
token, and an engine bug that echoes its input would pass a comparison against it. Presets
therefore record a larger `initializer_range` (the std of the seeded normal init) for which
greedy continuations vary; tests assert that variety before comparing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import LlamaConfig, MistralConfig, Qwen2Config

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rope(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """RoPE keyword arguments that transformers 4.x and 5.x configs both accept."""
    return {"rope_theta": theta, "rope_scaling": scaling}


def _tiny() -> Any:
    return LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
        **_rope(10000.0, {**_LLAMA3_ROPE, "factor": 4.0, "original_max_position_embeddings": 2048}),
        tie_word_embeddings=False,
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _tiny_qwen2() -> Any:
    return Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        **_rope(1000000.0, None),
        tie_word_embeddings=True,
        use_sliding_window=False,
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _llama(
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    *,
    tie: bool,
    max_pos: int,
    rope_factor: float | None,
) -> Any:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=hidden // heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        **_rope(500000.0, {**_LLAMA3_ROPE, "factor": rope_factor} if rope_factor else None),
        tie_word_embeddings=tie,
        initializer_range=0.02,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def _mistral_7b() -> Any:
    return MistralConfig(
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        **_rope(1000000.0, None),
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
    )


def _qwen2_7b() -> Any:
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        **_rope(1000000.0, None),
        tie_word_embeddings=False,
        use_sliding_window=False,
        initializer_range=0.02,
        bos_token_id=151643,
        eos_token_id=151643,
    )


_PRESETS: dict[str, Callable[[], Any]] = {
    "tiny": _tiny,
    "tiny-qwen2": _tiny_qwen2,
    "llama-3.2-1b": lambda: _llama(2048, 8192, 16, 32, tie=True, max_pos=131072, rope_factor=32.0),
    "llama-3-8b": lambda: _llama(4096, 14336, 32, 32, tie=False, max_pos=8192, rope_factor=None),
    # Llama 3.1 8B: the 3-8B shape with a 128K context (llama3 RoPE scaling).
    "llama-3.1-8b": lambda: _llama(4096, 14336, 32, 32, tie=False, max_pos=131072, rope_factor=8.0),
    "mistral-7b": _mistral_7b,
    "qwen2-7b": _qwen2_7b,
    "llama-3.1-70b": lambda: _llama(
        8192, 28672, 80, 64, tie=False, max_pos=131072, rope_factor=8.0
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset_config(name: str) -> Any:
    """A fresh transformers config for the preset `name`; unknown names list the known ones."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r} (presets: {', '.join(PRESET_NAMES)})"
        ) from None
    return factory()
