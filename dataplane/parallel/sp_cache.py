"""One SP member's KV cache for one request: preallocated, head-sharded or sequence-sharded.

* Ulysses (`HeadShardedKV`): every token of the request, this member's KV heads (g_r of g).
* Ring (`SeqShardedKV`): this member's tokens only, all KV heads, with their absolute positions.

Both reserve their memory up front — prompt plus decode tokens — so a request that is admitted
never allocates mid-prefill. With `pool` (the engine's `KVCache`) the rows come from the worker's
own KV pool and count against its memory accountant (a request that does not fit is refused
with the engine's DOES_NOT_FIT error); the (capacity, heads, d) buffer is a view over as many
contiguous pool rows as it needs. `free()` gives them back. Without a pool, plain tensors.

Writes are staged per forward: every layer's `extend` writes rows [n, n + new) and returns views
of [0, n + new); `commit(new)` advances n once the forward has run all layers.
"""

from __future__ import annotations

import math

import torch

from dataplane.engine.kv_cache import KVCache


class _Buffers:
    """Per-layer (capacity, heads, d) key and value buffers, from the pool or fresh."""

    def __init__(
        self,
        num_layers: int,
        capacity_tokens: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: KVCache | None,
        owner_id: str,
    ) -> None:
        self._pool = pool
        self._start: int | None = None
        numel = capacity_tokens * num_heads * head_dim
        if pool is None:
            shape = (num_layers, capacity_tokens, num_heads, head_dim)
            # (L, capacity, heads, d) -> L x (capacity, heads, d)
            self.keys = list(torch.empty(shape, dtype=dtype, device=device).unbind(0))
            self.values = list(torch.empty(shape, dtype=dtype, device=device).unbind(0))
            return
        row_numel = pool.k_pools[0].shape[1] * pool.k_pools[0].shape[2]
        rows = max(1, math.ceil(numel / row_numel))
        self._start = start = pool.reserve(owner_id, rows)  # raises DOES_NOT_FIT with numbers

        def carve(layer_pool: torch.Tensor) -> torch.Tensor:
            # (rows, Hkv, D) contiguous rows -> flat -> (capacity, heads, d)
            flat = layer_pool[start : start + rows].reshape(-1)
            return flat[:numel].view(capacity_tokens, num_heads, head_dim)

        self.keys = [carve(k) for k in pool.k_pools]
        self.values = [carve(v) for v in pool.v_pools]

    def free(self) -> None:
        """Return pool rows (idempotent); the views must not be used afterwards."""
        if self._pool is not None and self._start is not None:
            self._pool.release(self._start)
            self._start = None
        self.keys, self.values = [], []


class HeadShardedKV:
    """Ulysses cache: all tokens of the request for this member's `num_heads` KV heads."""

    def __init__(
        self,
        num_layers: int,
        capacity_tokens: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: KVCache | None = None,
        owner_id: str = "sp",
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.num_tokens = 0  # committed tokens
        self._buf = _Buffers(
            num_layers, capacity_tokens, num_heads, head_dim, dtype, device, pool, owner_id
        )

    def layer(self, layer_idx: int) -> _HeadLayer:
        """The `ulysses.LayerKV` view of one layer for the current forward."""
        return _HeadLayer(self, layer_idx)

    def extend(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage k, v (n, g_r, d) after the committed tokens; return views (num_tokens + n, ...)."""
        end = self.num_tokens + k.shape[0]
        if end > self.capacity_tokens:
            raise ValueError(f"KV capacity {self.capacity_tokens} tokens exceeded ({end})")
        keys, values = self._buf.keys[layer_idx], self._buf.values[layer_idx]
        keys[self.num_tokens : end] = k
        values[self.num_tokens : end] = v
        return keys[:end], values[:end]

    def commit(self, num_new_tokens: int) -> None:
        """The forward that staged `num_new_tokens` finished on every layer."""
        self.num_tokens += num_new_tokens

    def free(self) -> None:
        """Release the memory; idempotent."""
        self._buf.free()


class _HeadLayer:
    """Adapter: one layer of a HeadShardedKV as a `LayerKV`."""

    def __init__(self, cache: HeadShardedKV, layer_idx: int) -> None:
        self._cache, self._layer_idx = cache, layer_idx

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache.extend(self._layer_idx, k, v)


class SeqShardedKV:
    """Ring cache: this member's tokens (any positions), all KV heads."""

    def __init__(
        self,
        num_layers: int,
        capacity_tokens: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: KVCache | None = None,
        owner_id: str = "sp",
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.num_tokens = 0
        self.positions = torch.zeros(capacity_tokens, dtype=torch.int64, device=device)
        self._buf = _Buffers(
            num_layers, capacity_tokens, num_heads, head_dim, dtype, device, pool, owner_id
        )

    def extend(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage k, v (n, g, d) at `positions` (n,); return keys, values, positions views."""
        end = self.num_tokens + k.shape[0]
        if end > self.capacity_tokens:
            raise ValueError(f"KV capacity {self.capacity_tokens} tokens exceeded ({end})")
        keys, values = self._buf.keys[layer_idx], self._buf.values[layer_idx]
        keys[self.num_tokens : end] = k
        values[self.num_tokens : end] = v
        self.positions[self.num_tokens : end] = positions
        return keys[:end], values[:end], self.positions[:end]

    def view(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions of the committed tokens of one layer."""
        n = self.num_tokens
        return self._buf.keys[layer_idx][:n], self._buf.values[layer_idx][:n], self.positions[:n]

    def commit(self, num_new_tokens: int) -> None:
        """The forward that staged `num_new_tokens` finished on every layer."""
        self.num_tokens += num_new_tokens

    def free(self) -> None:
        """Release the memory; idempotent."""
        self._buf.free()
