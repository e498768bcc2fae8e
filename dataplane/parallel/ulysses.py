"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

For one prefill chunk split over P members (member r holds `seq_lens[r]` consecutive tokens,
uneven allowed), each member computes q/k/v for its tokens, and two all-to-alls give it *all*
chunk tokens for its heads (`HeadShard`, GQA-aware, KV heads replicated when g < P). Attention
over the full sequence is then local: the member's KV cache is head-sharded, so it already holds
every earlier token for its heads. A final all-to-all returns the outputs to the token owners.

    member r:  (n_r, h, d)  --a2a-->  (n_chunk, h_r, d)  --attend vs cache+chunk-->
               (n_chunk, h_r, d)  --a2a-->  (n_r, h, d)

Decode on the group keeps the KV head-sharded: every member computes the new token's q/k/v
(replicated; one token is cheap), attends over its own heads, and an uneven all-gather of the
head outputs rebuilds (n, h, d) on every member.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dataplane.parallel.attention import causal_suffix_attention
from dataplane.parallel.groups import Group
from dataplane.parallel.topology import HeadShard, offsets


class LayerKV(Protocol):
    """One layer of a member's head-sharded KV cache."""

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (n, g_r, d) and return views of all cached keys/values (L + n, g_r, d)."""
        ...


class GrowingKV:
    """A `LayerKV` that concatenates (simple, O(L) per call); the SP runner preallocates."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append and return everything cached."""
        self.keys = k if self.keys is None else torch.cat([self.keys, k])
        self.values = v if self.values is None else torch.cat([self.values, v])
        return self.keys, self.values


def _q_ranges(heads: tuple[HeadShard, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.q_lo, s.q_hi) for s in heads)


def _kv_ranges(heads: tuple[HeadShard, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.kv_lo, s.kv_hi) for s in heads)


def seq_to_heads(
    x: torch.Tensor, group: Group, seq_lens: tuple[int, ...], ranges: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """All-to-all: this member's tokens, all heads -> all tokens, this member's heads.

    `x` is (seq_lens[rank], H, d); rank s receives heads `ranges[s]` (ranges may overlap: GQA
    replication). Returns (sum(seq_lens), hi - lo, d) for this rank's range, in token order.
    """
    rank = group.rank
    d = x.shape[-1]
    if x.shape[0] != seq_lens[rank]:
        raise ValueError(f"x has {x.shape[0]} tokens, seq_lens[{rank}] is {seq_lens[rank]}")
    # (n_r, H, d) -> cat_s (n_r, h_s, d) flattened
    send = torch.cat([x[:, lo:hi].reshape(-1) for lo, hi in ranges])
    in_splits = [seq_lens[rank] * (hi - lo) * d for lo, hi in ranges]
    my_lo, my_hi = ranges[rank]
    out_splits = [n * (my_hi - my_lo) * d for n in seq_lens]
    recv = torch.empty(sum(out_splits), dtype=x.dtype, device=x.device)
    group.all_to_all(recv, send, out_splits, in_splits)
    # flat -> per source t: (n_t, h_r, d) -> cat over tokens (n_chunk, h_r, d)
    parts = torch.split(recv, out_splits)
    return torch.cat([p.view(n, my_hi - my_lo, d) for p, n in zip(parts, seq_lens, strict=True)])


def heads_to_seq(
    o: torch.Tensor, group: Group, seq_lens: tuple[int, ...], ranges: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """Inverse of `seq_to_heads` for a partition `ranges` (no overlap): (n_chunk, h_r, d) -> (n_r, H, d)."""
    rank = group.rank
    d = o.shape[-1]
    my_lo, my_hi = ranges[rank]
    starts = offsets(seq_lens)
    # (n_chunk, h_r, d) -> cat_t (n_t, h_r, d) flattened, in rank order
    send = torch.cat([o[s : s + n].reshape(-1) for s, n in zip(starts, seq_lens, strict=True)])
    in_splits = [n * (my_hi - my_lo) * d for n in seq_lens]
    out_splits = [seq_lens[rank] * (hi - lo) * d for lo, hi in ranges]
    recv = torch.empty(sum(out_splits), dtype=o.dtype, device=o.device)
    group.all_to_all(recv, send, out_splits, in_splits)
    # flat -> per source s: (n_r, h_s, d) -> cat over heads (n_r, H, d)
    parts = torch.split(recv, out_splits)
    n_r = seq_lens[rank]
    return torch.cat(
        [p.view(n_r, hi - lo, d) for p, (lo, hi) in zip(parts, ranges, strict=True)], dim=1
    )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    seq_lens: tuple[int, ...],
    heads: tuple[HeadShard, ...],
    kv: LayerKV,
) -> torch.Tensor:
    """Causal attention for one prefill chunk sharded over the group.

    Args:
        q: (seq_lens[rank], h, d) this member's chunk tokens, RoPE applied.
        k, v: (seq_lens[rank], g, d) likewise.
        group: the SP group; every member calls this in the same order.
        seq_lens: chunk tokens per rank (sum = chunk length); uneven allowed, 0 allowed.
        heads: `topology.head_shards(h, g, size)`.
        kv: this member's head-sharded cache for this layer, holding every earlier token; the
            chunk's KV (all chunk tokens, this member's KV heads) is appended to it.

    Returns:
        (seq_lens[rank], h, d) attention output for this member's tokens.
    """
    qh = seq_to_heads(q, group, seq_lens, _q_ranges(heads))  # (n_chunk, h_r, d)
    kh = seq_to_heads(k, group, seq_lens, _kv_ranges(heads))  # (n_chunk, g_r, d)
    vh = seq_to_heads(v, group, seq_lens, _kv_ranges(heads))  # (n_chunk, g_r, d)
    keys, values = kv.extend(kh, vh)  # (L + n_chunk, g_r, d)
    out_h = attend_own_heads(qh, keys, values, heads[group.rank], q.shape[1] // k.shape[1])
    return heads_to_seq(out_h, group, seq_lens, _q_ranges(heads))


def attend_own_heads(
    qh: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, shard: HeadShard, rep: int
) -> torch.Tensor:
    """Causal attention of the last `len(qh)` tokens over all cached tokens, own heads only.

    qh: (n, h_r, d); keys, values: (L + n, g_r, d); rep = query heads per KV head (GQA).
    """
    whole_groups = shard.num_q_heads % rep == 0 and shard.q_lo % rep == 0
    if whole_groups or shard.num_kv_heads == 1:
        return causal_suffix_attention(qh, keys, values)  # the GQA mapping is exact
    # A partial GQA group: map each query head to its KV head explicitly.
    kv_index = torch.tensor(
        [h // rep - shard.kv_lo for h in range(shard.q_lo, shard.q_hi)], device=qh.device
    )
    return causal_suffix_attention(qh, keys[:, kv_index], values[:, kv_index])


def ulysses_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    heads: tuple[HeadShard, ...],
    kv: LayerKV,
) -> torch.Tensor:
    """Decode step over a head-sharded cache; q/k/v are identical on every member.

    Args:
        q: (n, h, d) the new token(s), RoPE applied, replicated on all members.
        k, v: (n, g, d) likewise; this member appends its KV heads' slice to `kv`.
        kv: this member's head-sharded cache for this layer.

    Returns:
        (n, h, d) attention output, identical on every member.
    """
    shard = heads[group.rank]
    # (n, g, d) -> (n, g_r, d)
    keys, values = kv.extend(k[:, shard.kv_lo : shard.kv_hi], v[:, shard.kv_lo : shard.kv_hi])
    q_own = q[:, shard.q_lo : shard.q_hi]  # (n, h, d) -> (n, h_r, d)
    out_own = attend_own_heads(q_own, keys, values, shard, q.shape[1] // k.shape[1])
    n, d = q.shape[0], q.shape[2]
    # Uneven all-gather of head outputs as an all-to-all that sends the same block everywhere.
    flat = out_own.reshape(-1)  # (n, h_r, d) -> (n*h_r*d,)
    send = flat.repeat(group.size)
    in_splits = [flat.numel()] * group.size
    out_splits = [n * s.num_q_heads * d for s in heads]
    recv = torch.empty(sum(out_splits), dtype=q.dtype, device=q.device)
    group.all_to_all(recv, send.to(q.dtype), out_splits, in_splits)
    # flat -> per source s: (n, h_s, d) -> cat over heads (n, h, d)
    parts = torch.split(recv, out_splits)
    return torch.cat(
        [p.view(n, s.num_q_heads, d) for p, s in zip(parts, heads, strict=True)], dim=1
    )
