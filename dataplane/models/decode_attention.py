"""Split-KV (flash-decoding) attention for one-token queries over the KV pool, in Triton.

Import this module only where Triton is installed (the GPU image ships it; CPU machines and CI
may lack it): `dataplane.models.attention` imports it lazily. The contract::

    split_kv_decode(q, k_pool, v_pool, kv_starts, kv_lens, out, num_splits)
        q:               (B, Hq, D)    one query token per sequence, RoPE applied, D contiguous
        k_pool, v_pool:  (P, Hkv, D)   one layer's pool; sequence b attends rows
                                       kv_starts[b] + [0, kv_lens[b]) (kv_lens[b] >= 1)
        kv_starts, kv_lens: (B,) int32 on q's device
        out:             (B, Hq, D)    written in place; any row stride (e.g. a slice of (T, Hq, D))

Work split: the first kernel runs a (B, Hkv, num_splits) grid. Program (b, h, s) stacks the
G = Hq / Hkv query heads that share KV head h as the rows of one tile (padded to 16 rows for the
tensor cores), so each key row is read once per KV head and never repeated in memory, and it
attends split s of the sequence's keys: the keys are cut into `num_splits` equal pieces, each
rounded up to whole key blocks, so short sequences leave the last splits empty. A split writes
its normalised partial output and its log-sum-exp (base 2); the second kernel (grid (B, Hq))
merges the splits weighted by exp2(lse_s - max_s lse_s). With one split the first kernel writes
`out` itself. `num_splits` is a launch constant and lengths are read on the device, so one
launch shape serves any lengths, as a CUDA graph replay needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner-loop tile
MAX_SPLITS = 64  # upper bound on splits per sequence
MIN_SPLIT_TOKENS = 256  # below this many keys per split, more splits cost more than they give
PROGRAMS_PER_SM = 2  # target first-kernel programs per multiprocessor


def choose_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_kv_tokens: int) -> int:
    """Splits per sequence: enough programs to fill the device, none shorter than
    MIN_SPLIT_TOKENS for the longest sequence (`max_kv_tokens` may be an upper bound)."""
    wanted: int = triton.cdiv(PROGRAMS_PER_SM * num_sms, num_seqs * num_kv_heads)
    useful: int = triton.cdiv(max_kv_tokens, MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, wanted, useful))


def split_kv_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_starts: torch.Tensor,
    kv_lens: torch.Tensor,
    out: torch.Tensor,
    num_splits: int,
) -> None:
    """Attention of one query token per sequence over its pool rows; see the module docstring."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    for name, tensor in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32
    if num_splits == 1:
        part_out = part_lse = out  # unused placeholders
    else:
        part_out = torch.empty(
            num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device
        )
    _split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_pool,
        v_pool,
        kv_starts,
        kv_lens,
        out,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        out.stride(0),
        out.stride(1),
        1.0 / head_dim**0.5,
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_G=block_g,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        PRECISION=precision,
        num_warps=4,
        num_stages=3,
    )
    if num_splits > 1:
        _merge_kernel[(num_seqs, num_q_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=block_d,
            num_warps=4,
        )


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    starts_ptr,
    lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_vp,
    stride_vh,
    stride_ob,
    stride_oh,
    scale,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(starts_ptr + seq).to(tl.int64)
    length = tl.load(lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # the query heads of this KV head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    gd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0
    )  # (BLOCK_G, BLOCK_D)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for first in range(lo, hi, BLOCK_N):
        rows = first + n
        n_mask = rows < hi
        nd_mask = n_mask[:, None] & d_mask[None, :]
        pool_rows = (start + rows)[:, None]
        k = tl.load(
            k_ptr + pool_rows * stride_kp + kv_head * stride_kh + d[None, :],
            mask=nd_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (G, N)
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + pool_rows * stride_vp + kv_head * stride_vh + d[None, :],
            mask=nd_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        result = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=gd_mask,
        )
    else:
        has_keys = l_i > 0  # False for an empty split
        l_safe = tl.where(has_keys, l_i, 1.0)
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        slot = (seq * NUM_Q_HEADS + heads) * NUM_SPLITS + split  # (BLOCK_G,)
        tl.store(
            part_out_ptr + slot[:, None] * HEAD_DIM + d[None, :],
            acc / l_safe[:, None],
            mask=gd_mask,
        )
        tl.store(part_lse_ptr + slot, lse, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    slot = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + slot, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))  # split 0 always has keys: the max is finite
    parts = tl.load(
        part_out_ptr + slot[:, None] * HEAD_DIM + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    result = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + d,
        result.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )
