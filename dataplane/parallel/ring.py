"""Ring attention over a sequence-sharded KV cache, with online-softmax (LSE) merging.

Each member keeps the KV of the tokens it owns (all heads), for every chunk so far. For one
prefill chunk, member r's query block (its `seq_lens[r]` tokens, starting at position
`q_starts[r]`) travels around the ring together with its running (out, lse): at every hop the
holder computes the block's partial attention over *its local* KV and merges it in, then passes
the block on. After P hops the block is home with attention over all keys of the group.

This is the pass-Q form of ring attention. The textbook pass-KV form rotates KV blocks instead;
with chunked prefill the resident KV of all earlier chunks would have to travel on every chunk,
while the query block is only one chunk long, so pass-Q moves O(chunk) bytes per layer, not
O(prompt). Causality comes from absolute positions (`attention.attention_with_lse`), so blocks
with arbitrary offsets need no special cases.

Decode over the same cache: every member computes the new token's q (replicated), takes its
partial over local KV, and an all-gather of the (out, lse) partials is merged on every member.

Reference for the merge: the log-sum-exp form of online softmax (Milakov & Gimelshein 2018).
"""

from __future__ import annotations

import torch

from dataplane.parallel.attention import attention_with_lse, merge_partials
from dataplane.parallel.groups import Group
from dataplane.parallel.topology import ring_neighbors


def _pack(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(n, h, d) q, (n, h, d) out, (n, h) lse -> (n, h, 2d + 1) float32 block."""
    return torch.cat([q.float(), out, lse[..., None]], dim=-1)


def _unpack(blk: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, h, 2d + 1) -> q (n, h, d), out (n, h, d), lse (n, h)."""
    return blk[..., :d], blk[..., d : 2 * d], blk[..., 2 * d]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    group: Group,
    seq_lens: tuple[int, ...],
    q_starts: tuple[int, ...],
) -> torch.Tensor:
    """Causal attention of this member's chunk tokens over the KV of the whole group.

    Args:
        q: (seq_lens[rank], h, d) this member's chunk queries, RoPE applied.
        k, v: (m_r, g, d) this member's local KV: its earlier chunks plus this chunk's tokens
            (the caller appends before calling).
        k_pos: (m_r,) absolute positions of the local keys.
        group: the SP group.
        seq_lens: chunk tokens per rank; uneven and 0 allowed.
        q_starts: absolute position of each rank's first chunk token.

    Returns:
        (seq_lens[rank], h, d) attention output in q's dtype.
    """
    rank, size = group.rank, group.size
    if q.shape[0] != seq_lens[rank]:
        raise ValueError(f"q has {q.shape[0]} tokens, seq_lens[{rank}] is {seq_lens[rank]}")
    num_heads, d = q.shape[1], q.shape[2]
    nxt, prv = ring_neighbors(rank, size)
    n = q.shape[0]
    blk = _pack(
        q,
        torch.zeros(n, num_heads, d, device=q.device),
        torch.full((n, num_heads), float("-inf"), device=q.device),
    )
    for hop in range(size):
        owner = (rank - hop) % size  # the block held now came from this rank
        bq, bout, blse = _unpack(blk, d)
        q_pos = torch.arange(q_starts[owner], q_starts[owner] + seq_lens[owner], device=q.device)
        # The block travels in float32; q itself goes back to its dtype (exact for bf16/fp16
        # values) so that fused kernels apply.
        part_out, part_lse = attention_with_lse(bq.to(q.dtype), k, v, q_pos, k_pos)
        merged_out, merged_lse = merge_partials(bout, blse, part_out, part_lse)
        blk = _pack(bq, merged_out, merged_lse)
        if size == 1:
            break
        incoming = torch.empty(seq_lens[(owner - 1) % size], num_heads, 2 * d + 1, device=q.device)
        group.send_recv(blk, nxt, incoming, prv, tag=hop)
        blk = incoming
    _, out, _ = _unpack(blk, d)
    return out.to(q.dtype)


def ring_decode_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    group: Group,
) -> torch.Tensor:
    """Decode attention over a sequence-sharded cache; q is identical on every member.

    Args:
        q: (n, h, d) new token queries, replicated. q_pos: (n,) their positions.
        k, v: (m_r, g, d) this member's local KV, including the new token if it owns it.
        k_pos: (m_r,) positions of the local keys.

    Returns:
        (n, h, d) on every member, in q's dtype.
    """
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos)
    if group.size == 1:
        return out.to(q.dtype)
    packed = torch.cat([out, lse[..., None]], dim=-1)  # (n, h, d) + (n, h) -> (n, h, d + 1)
    gathered = [torch.empty_like(packed) for _ in range(group.size)]
    group.all_gather(gathered, packed)
    d = q.shape[-1]
    acc_out, acc_lse = gathered[0][..., :d], gathered[0][..., d]
    for part in gathered[1:]:
        acc_out, acc_lse = merge_partials(acc_out, acc_lse, part[..., :d], part[..., d])
    return acc_out.to(q.dtype)
