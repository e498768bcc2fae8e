"""`RequestQueue`: a priority queue of request ids with O(log n) push/pop and lazy removal."""

from __future__ import annotations

import heapq

QueueKey = tuple[int, int]  # (-priority, admission seq): higher priority first, then FCFS


class RequestQueue:
    """Requests waiting for a prefill, best first; removing one is O(1) (lazy)."""

    def __init__(self) -> None:
        self._heap: list[tuple[QueueKey, str]] = []
        self._live: dict[str, QueueKey] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def push(self, request_id: str, key: QueueKey) -> None:
        """Queue `request_id` at `key`; it must not be queued already."""
        assert request_id not in self._live, f"{request_id} queued twice"
        self._live[request_id] = key
        heapq.heappush(self._heap, (key, request_id))

    def remove(self, request_id: str) -> None:
        """Take `request_id` out of the queue (no-op when absent)."""
        self._live.pop(request_id, None)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(k, r) for r, k in self._live.items()]
            heapq.heapify(self._heap)

    def peek(self) -> tuple[QueueKey, str] | None:
        """The best (key, request id), or None when empty. Changes nothing visible."""
        heap = self._heap
        while heap:
            key, request_id = heap[0]
            if self._live.get(request_id) == key:
                return key, request_id
            heapq.heappop(heap)
        return None
