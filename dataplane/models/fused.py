"""Fused decoder steps: one Triton launch each on CUDA, the plain torch ops elsewhere.

The Triton kernels live in `dataplane.models.triton_ops`, imported only when a CUDA tensor
arrives and Triton is installed, so CPU machines (and CI) never import Triton. Both paths
compute the same function; the Triton one works in float32 and rounds once, the torch one
rounds after each op in half precision.

* `rope_qk(q, k, cos, sin) -> (q, k)`: RoPE on a step's queries and keys (CUDA: in place).
* `add_rms_norm(x, residual, norm) -> (normed, summed)`: summed = x + residual, then `norm`.
* `store_kv(k_pool, v_pool, k, v, slots)`: pool rows `slots` take the new keys and values.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Protocol

import torch

from dataplane.models.rope import apply_rope


class Norm(Protocol):
    """An RMSNorm module: its weight and epsilon, and the torch forward."""

    eps: float

    @property
    def weight(self) -> torch.Tensor:
        """The per-channel scale (a Parameter in the module: read-only here)."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized x, in x's dtype."""
        ...


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_installed()


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k) for (T, heads, head_dim) inputs and (T, head_dim) tables; on CUDA q and
    k are overwritten (callers pass views of a fresh projection output)."""
    if _use_triton(q):
        from dataplane.models.triton_ops import rope_qk_

        rope_qk_(q, k, cos, sin)
        return q, k
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: Norm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) for (T, hidden) inputs."""
    if _use_triton(x):
        from dataplane.models import triton_ops

        return triton_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    summed = x + residual
    return norm(summed), summed


def store_kv(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """k_pool[slots] = k and v_pool[slots] = v for (P, Hkv, D) pools and (T, Hkv, D) rows."""
    if _use_triton(k):
        from dataplane.models.triton_ops import store_kv_

        store_kv_(k_pool, v_pool, k, v, slots)
        return
    k_pool.index_copy_(0, slots, k)
    v_pool.index_copy_(0, slots, v)
