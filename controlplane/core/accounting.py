"""KV-cache accounting in tokens: per-instance capacity and per-request allocations.

Invariant: for every instance, the sum of its allocations never exceeds its capacity. The
ledger refuses (raises `KvCapacityError`) rather than overcommit. Also holds the pure admission
check: can a request ever fit instances of the given capacities.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from controlplane.core.errors import CoreError, ErrorCode, KvCapacityError
from controlplane.core.types import AdmissionVerdict


class KvLedger:
    """Per-instance KV capacity and per-request allocations, in tokens."""

    def __init__(self) -> None:
        self._capacity: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._by_request: dict[str, dict[str, int]] = {}  # request -> instance -> tokens
        self._by_instance: dict[str, set[str]] = {}  # instance -> requests holding KV
        self.num_frees = 0  # free() calls ever: a refused placement may fit after one

    def add_instance(self, instance_id: str, capacity_tokens: int) -> None:
        """Track a new instance with nothing allocated."""
        if instance_id in self._capacity:
            raise CoreError(ErrorCode.DUPLICATE_INSTANCE, f"instance {instance_id!r} is tracked")
        self._capacity[instance_id] = capacity_tokens
        self._used[instance_id] = 0
        self._by_instance[instance_id] = set()

    def remove_instance(self, instance_id: str) -> tuple[str, ...]:
        """Forget an instance; returns (sorted) the requests that had KV there, now dropped."""
        self._check(instance_id)
        holders = tuple(sorted(self._by_instance.pop(instance_id)))
        for request_id in holders:
            held = self._by_request[request_id]
            del held[instance_id]
            if not held:
                del self._by_request[request_id]
        del self._capacity[instance_id]
        del self._used[instance_id]
        return holders

    def capacity(self, instance_id: str) -> int:
        """KV capacity of the instance in tokens."""
        self._check(instance_id)
        return self._capacity[instance_id]

    def used(self, instance_id: str) -> int:
        """KV tokens allocated on the instance."""
        self._check(instance_id)
        return self._used[instance_id]

    def free_tokens(self, instance_id: str) -> int:
        """KV tokens still free on the instance."""
        try:
            return self._capacity[instance_id] - self._used[instance_id]
        except KeyError:
            self._check(instance_id)
            raise

    def can_allocate(self, instance_id: str, tokens: int) -> bool:
        """True when `tokens` more fit on the instance. Changes nothing."""
        return self.free_tokens(instance_id) >= tokens

    def allocate(self, request_id: str, instance_id: str, tokens: int) -> None:
        """Add `tokens` to the request's allocation on the instance.

        Raises:
            KvCapacityError: the instance has fewer than `tokens` free; nothing changes.
        """
        assert tokens >= 0, f"allocate {tokens} tokens for {request_id} on {instance_id}"
        free = self.free_tokens(instance_id)
        if tokens > free:
            raise KvCapacityError(instance_id, tokens, free)
        held = self._by_request.setdefault(request_id, {})
        held[instance_id] = held.get(instance_id, 0) + tokens
        self._used[instance_id] += tokens
        self._by_instance[instance_id].add(request_id)

    def free(self, request_id: str, instance_id: str) -> int:
        """Free the request's allocation on one instance; returns the tokens freed (0 if none)."""
        held = self._by_request.get(request_id)
        if held is None or instance_id not in held:
            return 0
        tokens = held.pop(instance_id)
        if not held:
            del self._by_request[request_id]
        self.num_frees += 1
        self._used[instance_id] -= tokens
        self._by_instance[instance_id].discard(request_id)
        return tokens

    def free_all(self, request_id: str) -> tuple[str, ...]:
        """Free the request's allocations everywhere; returns the instances freed, sorted."""
        instance_ids = tuple(sorted(self._by_request.get(request_id, {})))
        for instance_id in instance_ids:
            self.free(request_id, instance_id)
        return instance_ids

    def holdings(self, request_id: str) -> dict[str, int]:
        """Copy of the request's allocations: instance id -> tokens."""
        return dict(self._by_request.get(request_id, {}))

    def requests_on(self, instance_id: str) -> tuple[str, ...]:
        """Requests holding KV on the instance, sorted."""
        self._check(instance_id)
        return tuple(sorted(self._by_instance[instance_id]))

    def _check(self, instance_id: str) -> None:
        if instance_id not in self._capacity:
            raise CoreError(ErrorCode.UNKNOWN_INSTANCE, f"no instance {instance_id!r}")


def split_tokens(tokens: int, free_tokens: list[int]) -> list[int]:
    """Split `tokens` over instances with `free_tokens` as evenly as their room allows.

    Water-filling: each instance gets an equal share, capped by its free tokens, the rest is
    spread over the others. Returns shares in the input order, summing to `tokens`.
    Requires sum(free_tokens) >= tokens.
    """
    assert sum(free_tokens) >= tokens, f"cannot split {tokens} over free {free_tokens}"
    if len(free_tokens) == 1:
        return [tokens]
    order = sorted(range(len(free_tokens)), key=lambda i: free_tokens[i])
    shares = [0] * len(free_tokens)
    remaining = tokens
    for position, index in enumerate(order):
        left = len(order) - position
        share = min(free_tokens[index], -(-remaining // left))
        shares[index] = share
        remaining -= share
    assert remaining == 0, f"split left {remaining} of {tokens} over {free_tokens}"
    return shares


def max_group_tokens(capacities_tokens: Iterable[int], max_sp_degree: int) -> int:
    """KV tokens the best SP group of at most `max_sp_degree` instances can hold."""
    return sum(heapq.nlargest(max_sp_degree, capacities_tokens))


def check_fits(
    total_tokens: int, capacities_tokens: Iterable[int], max_sp_degree: int, what: str
) -> AdmissionVerdict:
    """Pure admission check: can `total_tokens` of KV ever fit a group of these instances?

    Args:
        total_tokens: prompt + max new tokens of the request.
        capacities_tokens: KV capacities of the instances eligible for it.
        max_sp_degree: most instances its KV may be spread over (1: a single instance).
        what: names the eligible instances in the reason, e.g. "general instances".

    Returns:
        ok when it fits, or when there are no eligible instances yet (nothing to judge by);
        otherwise a verdict whose reason names both numbers.
    """
    capacities = list(capacities_tokens)
    if not capacities:
        return AdmissionVerdict(ok=True)
    limit = max_group_tokens(capacities, max_sp_degree)
    if total_tokens <= limit:
        return AdmissionVerdict(ok=True)
    return AdmissionVerdict(
        ok=False,
        reason=(
            f"request needs {total_tokens} KV tokens (prompt + max_new_tokens) but at most "
            f"{limit} fit on {min(max_sp_degree, len(capacities))} of the "
            f"{len(capacities)} {what}"
        ),
        field="prompt_tokens",
    )
