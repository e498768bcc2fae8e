"""KV cache: one preallocated pool per worker, handed out as contiguous per-request ranges.

Layout: a single tensor (num_layers, 2, pool_tokens, Hkv, D); `keys(l)` / `values(l)` are
(pool_tokens, Hkv, D) views that `CachedAttention` reads and writes in place.

Why contiguous per-request ranges rather than paged blocks: a request declares its prompt
length and `max_new_tokens` up front, so the engine reserves exactly prompt + max_new_tokens
rows at admission and never allocates again. That makes the admission check the only memory
decision (a request that is admitted can never run out of KV mid-decode, and one that does not
fit is refused immediately with a clear error), lets prefill attention read a plain view of the
request's rows (flash / SDPA kernels without gathers), and makes KV export a slice per layer.
The cost is external fragmentation; first-fit with coalescing keeps it low for this workload
and the refusal message reports both the free total and the largest free extent.

The memory accountant (`plan_pool_tokens`) sizes the pool once: from a configured byte budget,
or on CUDA from the free device memory after the weights are resident, minus a reserve for the
activations of the largest iteration the token budget allows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from dataplane.engine.errors import EngineError, EngineErrorCode


class RangeAllocator:
    """First-fit allocator of contiguous row ranges in [0, capacity) with coalescing frees."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"capacity_tokens must be positive, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._free_starts: list[int] = [0]  # sorted starts of free extents
        self._free_sizes: dict[int, int] = {0: capacity_tokens}  # start -> length
        self._used: dict[int, int] = {}  # start -> length of allocated ranges

    @property
    def num_free_tokens(self) -> int:
        """Free rows in total."""
        return sum(self._free_sizes.values())

    @property
    def largest_free_tokens(self) -> int:
        """Length of the largest free extent (the biggest request that fits now)."""
        return max(self._free_sizes.values(), default=0)

    def allocate(self, num_tokens: int) -> int | None:
        """Start row of a new range of `num_tokens` rows, or None when no extent is big enough."""
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        for start in self._free_starts:
            size = self._free_sizes[start]
            if size >= num_tokens:
                self._remove_free(start)
                if size > num_tokens:
                    self._add_free(start + num_tokens, size - num_tokens)
                self._used[start] = num_tokens
                return start
        return None

    def free(self, start: int) -> None:
        """Return the range that begins at `start`; neighbours merge into one extent."""
        size = self._used.pop(start)
        idx = bisect.bisect_left(self._free_starts, start)
        if idx < len(self._free_starts):
            nxt = self._free_starts[idx]
            if nxt == start + size:
                size += self._free_sizes[nxt]
                self._remove_free(nxt)
        if idx > 0:
            prev = self._free_starts[idx - 1]
            if prev + self._free_sizes[prev] == start:
                start, size = prev, self._free_sizes[prev] + size
                self._remove_free(prev)
        self._add_free(start, size)

    def _add_free(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_sizes[start] = size

    def _remove_free(self, start: int) -> None:
        self._free_starts.remove(start)
        del self._free_sizes[start]


@dataclass(frozen=True, slots=True)
class KVPlan:
    """How many tokens the pool holds and why."""

    pool_tokens: int  # rows in the pool
    bytes_per_token: int  # K+V bytes over all layers for one row
    budget_bytes: int  # bytes given to the pool
    source: str  # "configured" or "free device memory"


def plan_pool_tokens(
    *,
    bytes_per_token: int,
    device: torch.device,
    kv_budget_bytes: int | None,
    activation_reserve_bytes: int,
    memory_fraction: float,
) -> KVPlan:
    """Size the pool from a configured budget, or from free CUDA memory minus the reserve."""
    if kv_budget_bytes is not None:
        budget, source = kv_budget_bytes, "configured"
    elif device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        usable = free_bytes - (1.0 - memory_fraction) * total_bytes
        budget, source = int(usable - activation_reserve_bytes), "free device memory"
    else:
        raise EngineError(
            EngineErrorCode.INVALID_ARGUMENT,
            f"kv_budget_bytes is required on device {device.type!r}",
        )
    pool_tokens = budget // bytes_per_token
    if pool_tokens <= 0:
        raise EngineError(
            EngineErrorCode.DOES_NOT_FIT,
            f"no memory for a KV cache: budget {budget} bytes ({source}), "
            f"{bytes_per_token} bytes per token, activation reserve {activation_reserve_bytes}",
        )
    return KVPlan(pool_tokens, bytes_per_token, budget, source)


class KVCache:
    """The pool tensor plus its allocator; requests own contiguous row ranges."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        pool_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # (num_layers, K/V, pool_tokens, Hkv, D)
        self.pool = torch.zeros(
            num_layers, 2, pool_tokens, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.allocator = RangeAllocator(pool_tokens)
        self.k_pools = [self.pool[layer, 0] for layer in range(num_layers)]
        self.v_pools = [self.pool[layer, 1] for layer in range(num_layers)]

    @property
    def pool_tokens(self) -> int:
        """Rows in the pool."""
        return self.allocator.capacity_tokens

    def reserve(self, request_id: str, num_tokens: int) -> int:
        """Start row of `num_tokens` rows for `request_id`; raises DOES_NOT_FIT with numbers."""
        start = self.allocator.allocate(num_tokens)
        if start is None:
            raise EngineError(
                EngineErrorCode.DOES_NOT_FIT,
                f"request {request_id!r} needs {num_tokens} KV tokens; "
                f"{self.allocator.num_free_tokens} of {self.pool_tokens} are free, "
                f"largest free extent {self.allocator.largest_free_tokens}",
            )
        return start

    def release(self, start: int) -> None:
        """Free the range beginning at `start`."""
        self.allocator.free(start)
