"""Local attention kernels used by the SP schemes, with position-based causal masks.

Layout convention (one sequence, no batch dim): q is (n, h, d), k and v are (m, g, d) with GQA
(h = g * rep); `q_pos` (n,) and `k_pos` (m,) are absolute token positions, and query i sees key j
iff `k_pos[j] <= q_pos[i]`. This covers chunked prefill (keys = history + chunk), ring blocks
with arbitrary offsets, and decode, without special cases.

Kernels: on CPU, PyTorch's fused CPU flash kernel; on CUDA in fp16/bf16, the flash-attention
kernel (`aten._flash_attention_forward`, GQA native, bottom-right causal, returns the LSE) for
the two shapes SP produces (a fully visible key prefix, and a causal diagonal block); an explicit
float32 softmax, blocked over query rows, for anything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Query rows per block: bounds the (h, rows, m) score matrix the math path materialises.
_BLOCK_Q_ROWS = 1024


def _expand_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """GQA: (m, g, d) -> (h, m, d) with each KV head repeated `rep` times."""
    # (m, g, d) -> (g, m, d) -> (g*rep, m, d)
    return x.transpose(0, 1).repeat_interleave(rep, dim=0)


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> int:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"need q (n,h,d), k=v (m,g,d); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0 or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q heads/dim {tuple(q.shape[1:])} incompatible with kv {tuple(k.shape[1:])}"
        )
    if q_pos.shape != (q.shape[0],) or k_pos.shape != (k.shape[0],):
        raise ValueError(f"q_pos {tuple(q_pos.shape)} / k_pos {tuple(k_pos.shape)} mismatch q/k")
    return q.shape[1] // k.shape[1]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention that also returns the log-sum-exp of each row's scores.

    On CPU this runs PyTorch's fused flash kernel (which returns the LSE); elsewhere an
    explicit float32 softmax, blocked over query rows. When `k_pos` is ascending (both SP
    caches keep it so), the keys older than every query of a block form a prefix that needs
    no mask; only the rest is masked, and the two partials are merged by LSE. On CUDA
    (fp16/bf16) with contiguous query positions, both parts run the flash kernel instead.

    Returns:
        out: (n, h, d) float32, zero for rows that see no key.
        lse: (n, h) float32, -inf for rows that see no key.
    """
    rep = _check(q, k, v, q_pos, k_pos)
    if _uses_cuda_flash(q):
        fast = _cuda_flash_with_lse(q, k, v, q_pos, k_pos)
        if fast is not None:
            return fast
    kh = _expand_kv(k, rep)  # (h, m, d)
    vh = _expand_kv(v, rep)  # (h, m, d)
    kernel = _flash_cpu_block if q.device.type == "cpu" else _math_block
    ascending = bool(torch.all(k_pos[1:] >= k_pos[:-1]))
    num_heads, m = q.shape[1], k.shape[0]
    outs, lses = [], []
    for lo in range(0, q.shape[0], _BLOCK_Q_ROWS):
        qb = q[lo : lo + _BLOCK_Q_ROWS].transpose(0, 1)  # (nb, h, d) -> (h, nb, d)
        qpb = q_pos[lo : lo + _BLOCK_Q_ROWS]
        # Keys [0, split) precede every query of the block: visible to all, no mask.
        split = int(torch.searchsorted(k_pos, qpb.min()).item()) if ascending else 0
        out = torch.zeros(num_heads, qb.shape[1], q.shape[2], device=q.device)
        lse = torch.full((num_heads, qb.shape[1]), float("-inf"), device=q.device)
        if split > 0:
            out, lse = kernel(qb, kh[:, :split], vh[:, :split], None)
        if split < m:
            visible = k_pos[None, split:] <= qpb[:, None]  # (nb, m - split)
            rest_out, rest_lse = kernel(qb, kh[:, split:], vh[:, split:], visible)
            sees_none = ~visible.any(dim=1)  # (nb,)
            rest_lse = rest_lse.masked_fill(sees_none[None, :], float("-inf"))
            rest_out = rest_out.masked_fill(sees_none[None, :, None], 0.0)
            out, lse = merge_partials(out, lse, rest_out, rest_lse)  # (h, nb, d), (h, nb)
        outs.append(out.transpose(0, 1))  # (h, nb, d) -> (nb, h, d)
        lses.append(lse.transpose(0, 1))  # (h, nb) -> (nb, h)
    if not outs:  # no queries
        empty = torch.zeros(0, num_heads, q.shape[2], device=q.device)
        return empty, torch.zeros(0, num_heads, device=q.device)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def _flash_cpu_block(
    qb: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU fused kernel; rows with no visible key come back garbage and are masked by caller."""
    if qb.shape[1] == 0 or kh.shape[1] == 0:
        return _math_block(qb, kh, vh, visible)
    bias = None
    if visible is not None:
        bias = torch.zeros(visible.shape, dtype=qb.dtype).masked_fill(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qb[None], kh[None], vh[None], 0.0, False, attn_mask=bias
    )  # (1, h, nb, d), (1, h, nb)
    return out[0].float(), lse[0].float()


def _math_block(
    qb: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit float32 softmax: (h, nb, d) queries over (h, m, d) keys -> out, lse."""
    scale = qb.shape[-1] ** -0.5
    scores = torch.matmul(qb.float(), kh.float().transpose(1, 2)) * scale  # (h, nb, m)
    if visible is not None:
        scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (h, nb)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])  # masked entries -> exp(-inf) = 0
    return torch.matmul(probs, vh.float()), lse  # (h, nb, d), (h, nb)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (online-softmax merge).

    out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}), done stably in log space;
    a side with lse = -inf (no visible keys) contributes nothing. Shapes: out (n, h, d), lse (n, h).
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (n, h)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    return out_a * w_a[..., None] + out_b * w_b[..., None], lse


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """Masked attention through PyTorch SDPA (fused kernels); every query must see >= 1 key.

    Returns (n, h, d) in q's dtype.
    """
    rep = _check(q, k, v, q_pos, k_pos)
    kh = k.transpose(0, 1)[None]  # (m, g, d) -> (1, g, m, d)
    vh = v.transpose(0, 1)[None]  # (m, g, d) -> (1, g, m, d)
    outs = []
    for lo in range(0, max(q.shape[0], 1), _BLOCK_Q_ROWS):  # one (empty) block if n == 0
        qb = q[lo : lo + _BLOCK_Q_ROWS].transpose(0, 1)[None]  # (nb, h, d) -> (1, h, nb, d)
        visible = k_pos[None, :] <= q_pos[lo : lo + _BLOCK_Q_ROWS, None]  # (nb, m)
        ob = F.scaled_dot_product_attention(qb, kh, vh, attn_mask=visible, enable_gqa=rep > 1)
        outs.append(ob[0].transpose(0, 1))  # (1, h, nb, d) -> (nb, h, d)
    return torch.cat(outs, dim=0)


def causal_suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention where the n queries are the last n of the m keys (chunked prefill).

    On CPU, two fused calls without an explicit mask — history keys [0, m - n) fully visible,
    chunk keys causal — merged by LSE; an (n, m) mask costs more than the attention itself at
    small head dims. On CUDA (fp16/bf16) one flash call, causal aligned bottom-right; elsewhere
    one masked SDPA call. q (n, h, d), k/v (m, g, d) -> (n, h, d).
    """
    n, m = q.shape[0], k.shape[0]
    if n > 0 and _uses_cuda_flash(q):
        _check(q, k, v, torch.zeros(n), torch.zeros(m))
        out, _ = _cuda_flash(q, k, v, causal=True)
        return out
    if q.device.type != "cpu" or n == 0:
        q_pos = torch.arange(m - n, m, device=q.device)
        return sdpa_attention(q, k, v, q_pos, torch.arange(m, device=q.device))
    rep = _check(q, k, v, torch.zeros(n), torch.zeros(m))
    qh = q.transpose(0, 1)[None]  # (n, h, d) -> (1, h, n, d)
    kh, vh = _expand_kv(k, rep)[None], _expand_kv(v, rep)[None]  # (m, g, d) -> (1, h, m, d)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_new, lse_new = fused(qh, kh[:, :, m - n :], vh[:, :, m - n :], 0.0, True)
    if m == n:
        only_new: torch.Tensor = out_new[0].transpose(0, 1)  # (1, h, n, d) -> (n, h, d)
        return only_new
    out_old, lse_old = fused(qh, kh[:, :, : m - n], vh[:, :, : m - n], 0.0, False)
    out, _ = merge_partials(
        out_old[0].transpose(0, 1).float(),  # (1, h, n, d) -> (n, h, d)
        lse_old[0].transpose(0, 1),  # (1, h, n) -> (n, h)
        out_new[0].transpose(0, 1).float(),  # (1, h, n, d) -> (n, h, d)
        lse_new[0].transpose(0, 1),  # (1, h, n) -> (n, h)
    )
    return out.to(q.dtype)


def _uses_cuda_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _cuda_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flash-attention call: q (n, h, d) over k/v (m, g, d), causal aligned bottom-right
    (query i sees keys j <= i + m - n). Returns out (n, h, d) in q's dtype and lse (n, h) fp32."""
    n, m = q.shape[0], k.shape[0]
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, m], dtype=torch.int32, device=q.device)
    result = torch.ops.aten._flash_attention_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_q,
        cu_k,
        n,
        m,
        0.0,
        causal,
        False,
        scale=1.0 / math.sqrt(q.shape[-1]),
    )
    out, lse = result[0], result[1]
    # Varlen LSE is (h, total_q) in current kernels and (batch, h, max_q) in older ones.
    lse = (lse[0] if lse.dim() == 3 else lse)[:, :n]  # (h, n)
    return out, lse.transpose(0, 1).float()  # (n, h, d), (n, h)


def _cuda_flash_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`attention_with_lse` through the flash kernel, or None where the mask has another shape.

    Needs q_pos contiguous and k_pos strictly ascending. Keys before the first query are a fully visible
    prefix; keys after the last query are invisible to all; the keys in between must be the
    positions q_pos[-(len):] exactly, a causal block aligned bottom-right. The (at most two)
    partials merge by LSE.
    """
    n, m = q.shape[0], k.shape[0]
    if n == 0 or m == 0:
        return None
    first, last = int(q_pos[0].item()), int(q_pos[-1].item())
    contiguous = last - first == n - 1 and torch.equal(
        q_pos, torch.arange(first, last + 1, device=q_pos.device, dtype=q_pos.dtype)
    )
    if not contiguous or not bool(torch.all(k_pos[1:] > k_pos[:-1])):
        return None
    split = int(torch.searchsorted(k_pos, first).item())  # keys [0, split) precede all queries
    end = int(torch.searchsorted(k_pos, last, right=True).item())  # keys [end, m) follow them
    diag = end - split
    if diag > 0 and int(k_pos[split].item()) != last - diag + 1:
        return None  # the in-between keys are not the last `diag` query positions
    h, d = q.shape[1], q.shape[2]
    out = torch.zeros(n, h, d, device=q.device)
    lse = torch.full((n, h), float("-inf"), device=q.device)
    if split > 0:
        prefix_out, prefix_lse = _cuda_flash(q, k[:split], v[:split], causal=False)
        out, lse = prefix_out.float(), prefix_lse
    if diag > 0:
        # The last `diag` queries and the diagonal keys share positions: plain causal. Earlier
        # queries see none of these keys (kernels disagree on the LSE of empty rows, so they
        # are not passed in).
        diag_out, diag_lse = _cuda_flash(q[n - diag :], k[split:end], v[split:end], causal=True)
        merged_out, merged_lse = merge_partials(
            out[n - diag :], lse[n - diag :], diag_out.float(), diag_lse
        )
        out = torch.cat([out[: n - diag], merged_out])
        lse = torch.cat([lse[: n - diag], merged_lse])
    return out, lse
