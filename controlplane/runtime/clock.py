"""The runtime's clock: epoch seconds that never go backwards.

The policy needs a non-decreasing `now_s`, and persisted timestamps must stay meaningful across
restarts, so the runtime uses wall-clock epoch seconds clamped to be monotonic. Tests pass a
fake implementing the same protocol.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Current time in epoch seconds, non-decreasing between calls."""

    def now_s(self) -> float:
        """Seconds since the epoch, never less than a previous call's result."""
        ...


class SystemClock:
    """`time.time()` clamped so it never steps backwards (NTP adjustments)."""

    def __init__(self) -> None:
        self._last_s = 0.0
        self._lock = threading.Lock()

    def now_s(self) -> float:
        """Seconds since the epoch, monotonic across threads."""
        with self._lock:
            self._last_s = max(self._last_s, time.time())
            return self._last_s
