"""SP prefill and decode of one long request over an SP group: one member's side.

Every member of the group builds an `SpRequest` for the same request and calls its collective
methods in the same order (the control plane's StartPrefill / Resume / decode decisions reach
all members). Layout for chunk c = [s, e) of the prompt, split over P members::

    member r computes tokens [s + off_r, s + off_r + n_r)   (n = split_evenly(e - s, P) or
                                                              split_weighted(..., weights))
    at their absolute positions (RoPE), so each member embeds, projects and runs the MLP for
    its shard only; attention is Ulysses (head-sharded KV) or ring (sequence-sharded KV).

The request pauses between chunks simply by not calling `run_next_chunk`: its KV stays in the
member caches and nothing is recomputed; meanwhile each member's engine may serve other
requests. After the last chunk the member holding the last prompt token has the logits;
`share_token` broadcasts the sampled token, and `decode` runs one token on the whole group with
the KV staying sharded (replicated per-token compute, sharded attention; see ulysses/ring).

Failure: a collective that fails (peer died, timeout) raises `GroupError`; the request then
frees its KV at once and every later call raises. The caller reports the failure, destroys the
group and goes on serving other requests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dataplane.engine.kv_cache import KVCache
from dataplane.models.attention import Attend
from dataplane.models.llama import LlamaForCausalLM
from dataplane.parallel.groups import Group, GroupError
from dataplane.parallel.ring import ring_attention, ring_decode_attention
from dataplane.parallel.sp_cache import HeadShardedKV, SeqShardedKV
from dataplane.parallel.topology import (
    SpKind,
    choose_sp_kind,
    chunk_bounds,
    decode_owner,
    head_shards,
    offsets,
    split_evenly,
    split_weighted,
)
from dataplane.parallel.ulysses import ulysses_attention, ulysses_decode_attention


def _chunks_for(num_tokens: int, chunk_tokens: int, size: int) -> tuple[tuple[int, int], ...]:
    """Chunk bounds where every chunk has >= `size` tokens: a shorter tail joins the chunk
    before it, so no member ever runs a forward on zero tokens."""
    chunks = list(chunk_bounds(num_tokens, chunk_tokens))
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < size:
        tail = chunks.pop()
        chunks[-1] = (chunks[-1][0], tail[1])
    return tuple(chunks)


def _split(num_tokens: int, size: int, weights: tuple[float, ...] | None) -> tuple[int, ...]:
    """Per-member token counts of one chunk: weighted when given, never 0 for anyone."""
    if weights is not None:
        counts = split_weighted(num_tokens, weights)
        if min(counts) > 0:
            return counts
    return split_evenly(num_tokens, size)


class SpRequest:
    """One member's state of a sequence-parallel request (prefill chunks, then decode).

    Args:
        model: this worker's model replica (same weights on every member).
        group: the SP group; rank order = shard order.
        request_id: for error messages and pool accounting.
        prompt_token_ids: the full prompt (every member knows it; each embeds only its shard).
        max_new_tokens: decode tokens to reserve KV for.
        chunk_tokens: prompt tokens per chunk (the pause granularity).
        kind: preferred SP kind; Ulysses falls back to ring when P > query heads.
        pool: the worker engine's KVCache to reserve rows from (None: private tensors).
        weights: relative member speeds for uneven shards (None: even split).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        group: Group,
        request_id: str,
        prompt_token_ids: list[int],
        *,
        max_new_tokens: int,
        chunk_tokens: int,
        kind: SpKind = SpKind.ULYSSES,
        pool: KVCache | None = None,
        weights: tuple[float, ...] | None = None,
    ) -> None:
        if weights is not None and len(weights) != group.size:
            raise ValueError(f"weights needs {group.size} entries, got {len(weights)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.group, self.request_id = model, group, request_id
        self.prompt = torch.tensor(prompt_token_ids, dtype=torch.int64)
        shape = model.shape
        self.kind = choose_sp_kind(kind, shape.num_q_heads, group.size)
        if len(prompt_token_ids) < group.size:
            raise ValueError(
                f"prompt_token_ids ({len(prompt_token_ids)} tokens) is shorter than the SP group "
                f"({group.size} members)"
            )
        self.chunks = _chunks_for(len(prompt_token_ids), chunk_tokens, group.size)
        self.splits = tuple(_split(e - s, group.size, weights) for s, e in self.chunks)
        self.num_chunks_done = 0
        self.num_decoded = 0
        self._failed: str | None = None
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        self._cache = self._make_cache(len(prompt_token_ids), max_new_tokens, dtype, pool)
        self._counts = [0] * group.size  # tokens each member holds (ring decode placement)

    def _make_cache(
        self, num_prompt_tokens: int, max_new_tokens: int, dtype: torch.dtype, pool: KVCache | None
    ) -> HeadShardedKV | SeqShardedKV:
        """This member's KV of the request: its KV heads of every token (Ulysses; sets `heads`),
        or every head of its own prompt tokens plus room for all decode tokens (ring)."""
        shape, group = self.model.shape, self.group
        if self.kind is SpKind.ULYSSES:
            self.heads = head_shards(shape.num_q_heads, shape.num_kv_heads, group.size)
            mine = self.heads[group.rank]
            capacity = num_prompt_tokens + max_new_tokens
            return HeadShardedKV(
                shape.num_layers,
                capacity,
                mine.num_kv_heads,
                shape.head_dim,
                dtype,
                self.device,
                pool,
                self.request_id,
            )
        own = sum(lens[group.rank] for lens in self.splits)
        # Decode tokens go to the least-loaded member; reserving all of them is safe.
        capacity = own + max_new_tokens
        return SeqShardedKV(
            shape.num_layers,
            capacity,
            shape.num_kv_heads,
            shape.head_dim,
            dtype,
            self.device,
            pool,
            self.request_id,
        )

    @property
    def num_chunks(self) -> int:
        """Prefill chunks in total."""
        return len(self.chunks)

    @property
    def is_prefill_done(self) -> bool:
        """All chunks ran."""
        return self.num_chunks_done == len(self.chunks)

    @property
    def last_token_rank(self) -> int:
        """The member whose shard of the last chunk holds the last prompt token."""
        last = self.splits[-1]
        return max(r for r in range(len(last)) if last[r] > 0)

    def _live(self) -> None:
        if self._failed is not None:
            raise GroupError(
                self.group.group_id, f"SP request {self.request_id!r} failed: {self._failed}"
            )

    def run_next_chunk(self) -> torch.Tensor | None:
        """Run the next prefill chunk (collective). Returns the last prompt token's logits
        (vocab,) float32 on `last_token_rank` after the last chunk, None otherwise."""
        self._live()
        if self.is_prefill_done:
            raise RuntimeError(f"SP request {self.request_id!r}: prefill already done")
        c = self.num_chunks_done
        (start, _), lens = self.chunks[c], self.splits[c]
        starts = tuple(start + o for o in offsets(lens))
        rank = self.group.rank
        lo, hi = starts[rank], starts[rank] + lens[rank]
        ids = self.prompt[lo:hi].to(self.device)
        positions = torch.arange(lo, hi, device=self.device)
        is_last = c == len(self.chunks) - 1 and rank == self.last_token_rank
        want = torch.tensor([hi - lo - 1] if is_last else [], dtype=torch.int64, device=self.device)
        cache = self._cache

        def attend(
            layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            if isinstance(cache, HeadShardedKV):
                return ulysses_attention(
                    q, k, v, self.group, lens, self.heads, cache.layer(layer_idx)
                )
            keys, values, k_pos = cache.extend(layer_idx, k, v, positions)
            return ring_attention(q, keys, values, k_pos, self.group, lens, starts)

        logits = self._forward(ids, positions, attend, want)
        cache.commit(sum(lens) if isinstance(cache, HeadShardedKV) else hi - lo)
        self._counts = [n + m for n, m in zip(self._counts, lens, strict=True)]
        self.num_chunks_done += 1
        return logits[0] if is_last else None

    def share_token(self, token_id: int | None) -> int:
        """Broadcast the token sampled on `last_token_rank` (others pass None). Collective."""
        self._live()
        t = torch.tensor(
            [-1 if token_id is None else token_id], dtype=torch.int64, device=self.device
        )
        self._collective(lambda: self.group.all_reduce_max(t))
        return int(t.item())

    def decode(self, token_id: int) -> torch.Tensor:
        """Feed `token_id` (the last sampled token) on every member; returns the next logits
        (vocab,) float32, identical on every member. Collective."""
        self._live()
        if not self.is_prefill_done:
            raise RuntimeError(f"SP request {self.request_id!r}: decode before prefill is done")
        pos = len(self.prompt) + self.num_decoded
        ids = torch.tensor([token_id], dtype=torch.int64, device=self.device)
        positions = torch.tensor([pos], device=self.device)
        cache = self._cache
        owner = decode_owner(tuple(self._counts))

        def attend(
            layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            if isinstance(cache, HeadShardedKV):
                return ulysses_decode_attention(
                    q, k, v, self.group, self.heads, cache.layer(layer_idx)
                )
            if self.group.rank == owner:
                keys, values, k_pos = cache.extend(layer_idx, k, v, positions)
            else:
                keys, values, k_pos = cache.view(layer_idx)
            return ring_decode_attention(q, positions, keys, values, k_pos, self.group)

        logits = self._forward(ids, positions, attend, None)
        if isinstance(cache, HeadShardedKV) or self.group.rank == owner:
            cache.commit(1)
        self._counts[owner] += 1
        self.num_decoded += 1
        return logits[0]

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, want: torch.Tensor | None
    ) -> torch.Tensor:
        result: list[torch.Tensor] = []

        def run() -> None:
            with torch.inference_mode():
                result.append(self.model(ids, positions, attend, want))

        self._collective(run)
        return result[0]

    def _collective(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except GroupError as exc:
            self._failed = exc.detail
            self.free()
            raise

    def free(self) -> None:
        """Release this member's KV (idempotent). Called automatically on failure."""
        self._cache.free()
