"""`Deadlines`: requests' own deadlines (`RequestSpec.deadline_s`), earliest first."""

from __future__ import annotations

import heapq
from typing import NamedTuple

from controlplane.core.records import RequestRecord


class Deadline(NamedTuple):
    """A request's deadline (`Deadlines.heap`, earliest first)."""

    at_s: float
    seq: int  # admission seq: ties in admission order
    request_id: str


class Deadlines:
    """A heap of request deadlines; entries of requests already terminal or forgotten are
    dropped when popped. `requests` is the owning state's map (shared, not copied)."""

    def __init__(self, requests: dict[str, RequestRecord]) -> None:
        self._requests = requests
        self.heap: list[Deadline] = []

    def add(self, req: RequestRecord) -> None:
        """Track `req`'s deadline (it must have one)."""
        assert req.spec.deadline_s is not None, f"{req.request_id} has no deadline"
        heapq.heappush(self.heap, Deadline(req.spec.deadline_s, req.seq, req.request_id))

    def pop_expired(self, now_s: float) -> list[RequestRecord]:
        """Live requests whose deadline is at or before `now_s`, earliest first (removed)."""
        heap, out = self.heap, []
        while heap and heap[0].at_s <= now_s:
            req = self._requests.get(heapq.heappop(heap).request_id)
            if req is not None and not req.state.is_terminal:
                out.append(req)
        return out
