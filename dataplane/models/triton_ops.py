"""Fused per-token kernels of the decoder in Triton: RoPE, residual add + RMSNorm, KV store.

Import this module only where Triton is installed (CUDA machines): its callers import it lazily
and keep a torch path for CPU. In a small-batch decode step each torch elementwise op is one
launch of a few microseconds per layer (RoPE alone is ten); these fold them, one program per
token, computing in float32::

    rope_qk_(q, k, cos, sin)            RoPE on q (T, Hq, D) and k (T, Hkv, D) in place (any
                                        token/head strides, D contiguous); cos, sin (T, D)
                                        contiguous, the half-split tables of `rope_cos_sin`
    add_rms_norm(x, residual, weight, eps) -> (normed, summed)
                                        summed = x + residual (rounded to x's dtype, as the
                                        unfused add is), normed = RMSNorm(summed) * weight;
                                        x, residual (T, H) contiguous
    store_kv_(k_pool, v_pool, k, v, slots)
                                        k_pool[slots[t]] = k[t], v_pool[slots[t]] = v[t];
                                        pools (P, Hkv, D), k, v (T, Hkv, D), D contiguous
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place by per-token tables; see the module docstring."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("q, k need a contiguous last dim and cos, sin must be contiguous")
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=k.shape[1],
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_Q=triton.next_power_of_2(num_q_heads),
        BLOCK_KV=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )


@triton.jit
def _rotate(
    x_ptr,
    cos1,
    cos2,
    sin1,
    sin2,
    stride_h,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate NUM_HEADS heads starting at x_ptr: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < NUM_HEADS)[:, None] & (j < HALF)[None, :]
    first = x_ptr + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    out1 = x1.to(tl.float32) * cos1[None, :] - x2.to(tl.float32) * sin1[None, :]
    out2 = x2.to(tl.float32) * cos2[None, :] + x1.to(tl.float32) * sin2[None, :]
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    table = token * HEAD_DIM + j
    cos1 = tl.load(cos_ptr + table, mask=j_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + HALF, mask=j_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=j_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + HALF, mask=j_mask, other=0.0).to(tl.float32)
    _rotate(
        q_ptr + token * stride_qt, cos1, cos2, sin1, sin2, stride_qh,
        NUM_Q_HEADS, HALF, BLOCK_Q, BLOCK_HALF,
    )  # fmt: skip
    _rotate(
        k_ptr + token * stride_kt, cos1, cos2, sin1, sin2, stride_kh,
        NUM_KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF,
    )  # fmt: skip


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); see the module docstring."""
    if not x.is_contiguous() or not residual.is_contiguous():
        raise ValueError("x and residual must be contiguous")
    num_tokens, hidden = x.shape
    normed, summed = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        residual,
        weight,
        normed,
        summed,
        eps,
        HIDDEN=hidden,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=8 if hidden >= 2048 else 4,
    )
    return normed, summed


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    normed_ptr,
    summed_ptr,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * HIDDEN
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + residual).to(summed_ptr.dtype.element_ty)
    tl.store(summed_ptr + row + cols, summed, mask=mask)
    total = summed.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(total * total, 0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = total * inv_rms * weight
    tl.store(normed_ptr + row + cols, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def store_kv_(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write each token's k and v rows at its pool slot; see the module docstring."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_pool.stride(1) != head_dim or v_pool.stride(1) != head_dim:
        raise ValueError("pool rows must be (Hkv, D) contiguous")
    if k.stride(1) != head_dim or v.stride(1) != head_dim or k.stride(2) != 1:
        raise ValueError("k and v rows must be (Hkv, D) contiguous")
    _store_kv_kernel[(num_tokens,)](
        k_pool,
        v_pool,
        k,
        v,
        slots,
        k_pool.stride(0),
        v_pool.stride(0),
        k.stride(0),
        v.stride(0),
        ROW=num_kv_heads * head_dim,
        BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
        num_warps=4,
    )


@triton.jit
def _store_kv_kernel(
    k_pool_ptr,
    v_pool_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    stride_kp,
    stride_vp,
    stride_k,
    stride_v,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW
    k = tl.load(k_ptr + token * stride_k + cols, mask=mask)
    v = tl.load(v_ptr + token * stride_v + cols, mask=mask)
    tl.store(k_pool_ptr + slot * stride_kp + cols, k, mask=mask)
    tl.store(v_pool_ptr + slot * stride_vp + cols, v, mask=mask)
