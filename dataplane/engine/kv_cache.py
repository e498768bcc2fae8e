"""KV cache: one preallocated pool per worker, handed out as contiguous per-request ranges.

Layout: a single tensor (num_layers, 2, pool_tokens, Hkv, D); `keys(l)` / `values(l)` are
(pool_tokens, Hkv, D) views that `CachedAttention` reads and writes in place.

Why contiguous per-request ranges rather than paged blocks: a request declares its prompt
length and `max_new_tokens` up front, so the engine reserves exactly prompt + max_new_tokens
rows at admission and never allocates again. That makes the admission check the only memory
decision (a request that is admitted can never run out of KV mid-decode, and one that does not
fit is refused immediately with a clear error), lets prefill attention read a plain view of the
request's rows (flash / SDPA kernels without gathers), and makes KV export a slice per layer.
The cost is external fragmentation, which first-fit with coalescing alone does not keep low
under a mixed workload (e.g. 1803 of 4096 rows free, largest extent 531). So when the free
total fits a reservation but no extent does, the pool is compacted: every unpinned movable range
(`KVRange`, the engine's requests) slides down to the end of the range below it, one strided
device copy of all layers' K and V per range, in ascending order so a move never overwrites a
row that is still to be read. Only moved rows are copied, and only when that makes the request
fit. Ranges that callers hold views of never move: fixed reservations (`reserve`: SP caches,
the CUDA-graph scratch row) and pinned movable ranges (the engine pins a request while views
from `export_kv` / `begin_import` are outstanding). When pinned ranges keep the request from
fitting even after compaction it is refused with DOES_NOT_FIT naming the numbers.
`can_fit` / `largest_fit_tokens` answer exactly, compaction included.

The memory accountant (`plan_pool_tokens`) sizes the pool once: from a configured byte budget,
or on CUDA from the free device memory after the weights are resident, minus a reserve for the
activations of the largest iteration the token budget allows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from dataplane.engine.errors import EngineError, EngineErrorCode

STAGE_TOKENS = 256  # rows per staged block when a compaction move overlaps itself


class RangeAllocator:
    """First-fit allocator of contiguous row ranges in [0, capacity) with coalescing frees."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"capacity_tokens must be positive, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._free_starts: list[int] = [0]  # sorted starts of free extents
        self._free_sizes: dict[int, int] = {0: capacity_tokens}  # start -> length
        self._used: dict[int, int] = {}  # start -> length of allocated ranges
        self._num_free = capacity_tokens

    @property
    def num_free_tokens(self) -> int:
        """Free rows in total."""
        return self._num_free

    @property
    def largest_free_tokens(self) -> int:
        """Length of the largest free extent (the biggest range that fits without moving any)."""
        return max(self._free_sizes.values(), default=0)

    def used_ranges(self) -> list[tuple[int, int]]:
        """Allocated ranges as (start, length), sorted by start."""
        return sorted(self._used.items())

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
                self._num_free -= num_tokens
                return start
        return None

    def free(self, start: int) -> None:
        """Return the range that begins at `start`; neighbours merge into one extent."""
        size = self._used.pop(start)
        self._num_free += size
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

    def relocate(self, moves: list[tuple[int, int]]) -> None:
        """Move allocated ranges, given as (old start, new start), and rebuild the free extents.

        The caller guarantees the new layout has no overlaps (`KVCache.compact` does).
        """
        moved = {old: self._used.pop(old) for old, _ in moves}
        for old, new in moves:
            self._used[new] = moved[old]
        self._free_starts, self._free_sizes, end = [], {}, 0
        for start, size in self.used_ranges():
            if start < end:
                raise ValueError(f"relocated range at {start} overlaps the one ending at {end}")
            if start > end:
                self._free_starts.append(end)
                self._free_sizes[end] = start - end
            end = start + size
        if end < self.capacity_tokens:
            self._free_starts.append(end)
            self._free_sizes[end] = self.capacity_tokens - end

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


@dataclass(slots=True, eq=False)
class KVRange:
    """A movable reservation: compaction may change `start` while `pins` is 0.

    Whoever hands out views of the rows (export, import) must pin the range for as long as the
    views are in use; a pinned range never moves.
    """

    owner: str  # for error messages
    start: int  # first pool row (changes when compaction moves the range)
    num_tokens: int  # rows owned
    pins: int = 0  # outstanding views; > 0 makes the range immovable


class KVCache:
    """The pool tensor plus its allocator; requests own contiguous row ranges.

    Two kinds of reservation: `reserve` gives a fixed start row (the caller may keep views of
    the rows: SP caches, the CUDA-graph scratch row), `reserve_movable` a `KVRange` that
    compaction may move down while it is unpinned.
    """

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
        self._movable: dict[int, KVRange] = {}  # start -> movable range
        self.num_compactions = 0  # compactions run so far
        self.num_moved_tokens = 0  # rows copied by them
        self.stage_tokens = STAGE_TOKENS  # staged block size of overlapping moves

    @property
    def pool_tokens(self) -> int:
        """Rows in the pool."""
        return self.allocator.capacity_tokens

    @property
    def largest_fit_tokens(self) -> int:
        """The largest reservation that succeeds now, counting what compaction would free up."""
        return max(self.allocator.largest_free_tokens, self._plan()[1])

    def can_fit(self, num_tokens: int) -> bool:
        """Whether `reserve`/`reserve_movable` of `num_tokens` rows would succeed now."""
        alloc = self.allocator
        if num_tokens <= alloc.largest_free_tokens:
            return True
        return num_tokens <= alloc.num_free_tokens and num_tokens <= self._plan()[1]

    def reserve(self, request_id: str, num_tokens: int) -> int:
        """Start row of `num_tokens` fixed rows for `request_id`; raises DOES_NOT_FIT with numbers.

        The range never moves, so the caller may keep views of it until `release`.
        """
        return self._allocate(request_id, num_tokens)

    def reserve_movable(self, owner: str, num_tokens: int) -> KVRange:
        """A range of `num_tokens` rows that compaction may move while unpinned."""
        rng = KVRange(owner, self._allocate(owner, num_tokens), num_tokens)
        self._movable[rng.start] = rng
        return rng

    def release(self, start: int) -> None:
        """Free the range beginning at `start` (for a KVRange: its current `start`)."""
        self._movable.pop(start, None)
        self.allocator.free(start)

    def compact(self) -> int:
        """Slide every unpinned movable range down as far as it goes; returns rows copied.

        Fixed and pinned ranges stay; ranges above one only slide down to its end, so the free
        rows gather in one extent below each of them and one at the top of the pool.
        """
        moves, _ = self._plan()
        for rng, new_start in moves:  # ascending old starts: a move never hits a live row
            self._copy_rows(rng.start, new_start, rng.num_tokens)
        self.allocator.relocate([(rng.start, new_start) for rng, new_start in moves])
        for rng, _ in moves:
            del self._movable[rng.start]
        for rng, new_start in moves:
            rng.start = new_start
            self._movable[new_start] = rng
        moved = sum(rng.num_tokens for rng, _ in moves)
        self.num_compactions += 1
        self.num_moved_tokens += moved
        return moved

    def _allocate(self, owner: str, num_tokens: int) -> int:
        alloc = self.allocator
        start = alloc.allocate(num_tokens)
        if start is None and num_tokens <= alloc.num_free_tokens:
            if self._plan()[1] >= num_tokens:  # compact only when it makes the request fit
                self.compact()
                start = alloc.allocate(num_tokens)
        if start is None:
            pinned = sum(
                size
                for row, size in alloc.used_ranges()
                if row not in self._movable or self._movable[row].pins > 0
            )
            raise EngineError(
                EngineErrorCode.DOES_NOT_FIT,
                f"request {owner!r} needs {num_tokens} KV tokens; "
                f"{alloc.num_free_tokens} of {self.pool_tokens} are free, "
                f"largest free extent {alloc.largest_free_tokens} "
                f"({self._plan()[1]} after compaction; {pinned} rows are pinned: in-flight "
                f"KV transfers, SP caches and fixed reservations do not move)",
            )
        return start

    def _plan(self) -> tuple[list[tuple[KVRange, int]], int]:
        """Compaction moves (range, new start) in ascending order, and the largest free extent
        the pool would have after them. O(live ranges)."""
        moves: list[tuple[KVRange, int]] = []
        largest = end = 0
        for start, size in self.allocator.used_ranges():
            rng = self._movable.get(start)
            if rng is not None and rng.pins == 0:
                if start != end:
                    moves.append((rng, end))
                end += size
            else:
                largest = max(largest, start - end)
                end = start + size
        return moves, max(largest, self.pool_tokens - end)

    def _copy_rows(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy rows [src, src + n) to [dst, dst + n) (dst < src) for every layer's K and V.

        Overlapping moves copy ascending blocks that never overlap the rows they read: blocks
        of the shift itself when it is large, else blocks staged through a small buffer.
        """
        shift, block = src - dst, self.stage_tokens
        if shift >= min(num_tokens, block):
            for off in range(0, num_tokens, shift):
                n = min(shift, num_tokens - off)
                self.pool[:, :, dst + off : dst + off + n].copy_(
                    self.pool[:, :, src + off : src + off + n]
                )
            return
        stage = torch.empty_like(self.pool[:, :, :block])
        for off in range(0, num_tokens, block):
            n = min(block, num_tokens - off)
            stage[:, :, :n].copy_(self.pool[:, :, src + off : src + off + n])
            self.pool[:, :, dst + off : dst + off + n].copy_(stage[:, :, :n])
