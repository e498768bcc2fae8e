"""Pure topology math for SP groups: shard lengths, head partitions, ring neighbours.

Nothing here touches torch or a process group; every function is deterministic and returns
plain tuples, so all members of a group compute the same layout independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SpKind(Enum):
    """How SP attention is computed; values mirror `SpKind` in protos/pecsched/v1/common.proto."""

    ULYSSES = 1  # all-to-all: sequence-sharded -> head-sharded -> attention -> back
    RING = 2  # ring P2P (query blocks rotate, KV stays put) with online-softmax (LSE) merge


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The attention heads one SP member owns under Ulysses.

    Query heads are a contiguous range; the KV heads are the GQA groups those query heads
    read, so a KV head is replicated on every member whose query heads touch its group.
    """

    q_lo: int  # first query head (inclusive)
    q_hi: int  # last query head (exclusive)
    kv_lo: int  # first KV head (inclusive)
    kv_hi: int  # last KV head (exclusive)

    @property
    def num_q_heads(self) -> int:
        """Number of query heads in this shard."""
        return self.q_hi - self.q_lo

    @property
    def num_kv_heads(self) -> int:
        """Number of KV heads in this shard (with GQA replication)."""
        return self.kv_hi - self.kv_lo


def split_evenly(total: int, parts: int) -> tuple[int, ...]:
    """Split `total` items into `parts` contiguous counts that differ by at most one.

    Earlier parts get the extra items. `parts` must be >= 1; counts may be 0 when
    total < parts.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def split_weighted(total: int, weights: tuple[float, ...]) -> tuple[int, ...]:
    """Split `total` items into contiguous counts proportional to `weights` (uneven SP shards).

    Uses largest-remainder rounding, ties to the lower index, so the counts sum to `total`.
    Useful when members differ in speed or free memory.
    """
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def offsets(lengths: tuple[int, ...]) -> tuple[int, ...]:
    """Exclusive prefix sums: `offsets((3, 2, 4)) == (0, 3, 5)`."""
    out: list[int] = []
    acc = 0
    for n in lengths:
        out.append(acc)
        acc += n
    return tuple(out)


def head_shards(num_heads: int, num_kv_heads: int, size: int) -> tuple[HeadShard, ...]:
    """Partition query heads over `size` members for Ulysses, GQA-aware.

    Query heads are split evenly (sizes differ by at most one), so any `size <= num_heads`
    works, including sizes that do not divide the head count. Each member gets the KV heads of
    the GQA groups its query heads use; when `num_kv_heads < size` KV heads are replicated.

    Raises:
        ValueError: if `size > num_heads` (use ring attention) or the GQA shape is invalid.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    if not 1 <= size <= num_heads:
        raise ValueError(f"Ulysses needs 1 <= size <= num_heads ({num_heads}), got size={size}")
    rep = num_heads // num_kv_heads
    counts = split_evenly(num_heads, size)
    shards = []
    for lo, n in zip(offsets(counts), counts, strict=True):
        hi = lo + n
        shards.append(HeadShard(q_lo=lo, q_hi=hi, kv_lo=lo // rep, kv_hi=(hi - 1) // rep + 1))
    return tuple(shards)


def choose_sp_kind(preferred: SpKind, num_heads: int, size: int) -> SpKind:
    """The SP kind to run: `preferred`, except Ulysses falls back to ring when size > num_heads."""
    if preferred is SpKind.ULYSSES and size > num_heads:
        return SpKind.RING
    return preferred


def ring_neighbors(rank: int, size: int) -> tuple[int, int]:
    """(next, prev) ranks on the ring of `size` members."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    return (rank + 1) % size, (rank - 1) % size


def decode_owner(num_tokens_per_member: tuple[int, ...]) -> int:
    """The member that stores the next decode token's KV in a sequence-sharded (ring) cache.

    The member holding the fewest tokens (ties to the lowest rank), which keeps shards balanced.
    """
    if not num_tokens_per_member:
        raise ValueError("num_tokens_per_member must not be empty")
    return min(range(len(num_tokens_per_member)), key=lambda r: (num_tokens_per_member[r], r))


def chunk_bounds(num_tokens: int, chunk_tokens: int) -> tuple[tuple[int, int], ...]:
    """[start, end) token ranges of the prefill chunks of a prompt of `num_tokens`."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return tuple((s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens))


class KVTransport(Enum):
    """How one KV transfer moves its bytes (chosen per worker pair by `kv_transport`)."""

    PAIR_GROUP = "pair_group"  # send/recv over the pair's persistent group (gloo, or NCCL)
    CUDA_IPC = "cuda_ipc"  # the receiver copies from the sender's pool through an IPC handle


def kv_transport(device_type: str, same_node: bool) -> KVTransport:
    """The transport for a pair of workers: CUDA IPC between GPUs of one node (one GPU or two),
    else point-to-point over the pair's group (NCCL between nodes, gloo on CPU)."""
    if device_type == "cuda" and same_node:
        return KVTransport.CUDA_IPC
    return KVTransport.PAIR_GROUP


def shared_devices(device_keys: tuple[str, ...]) -> tuple[str, ...]:
    """The devices that more than one SP member would use (sorted); empty when none is shared.

    A device key names one physical device of one node (e.g. "node-a/cuda:0"); members on CPU
    have no key to share (""). NCCL cannot put two ranks of one communicator on one GPU, so
    an SP group over shared GPUs is refused rather than left to hang.
    """
    seen: set[str] = set()
    shared: set[str] = set()
    for key in device_keys:
        if key and key in seen:
            shared.add(key)
        seen.add(key)
    return tuple(sorted(shared))
