"""Waiting on conditions in tests: the one place that polls.

A test never sleeps to let something happen; it waits until a condition holds, with a generous
timeout (CI runs the suite on a loaded 2-core box) and a failure that says what was awaited and
what was last seen. To check that something did NOT happen, wait for a later event that must
come after it, then assert on the earlier one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.01  # between checks: short enough not to slow a test, long enough not to spin


def wait_until(
    predicate: Callable[[], T], what: str, timeout_s: float = 30.0, poll_s: float = POLL_S
) -> T:
    """Return `predicate()`'s first truthy value, checked every `poll_s` on this thread (a
    predicate may drive what it waits for: step a worker, poll a transfer).

    Raises:
        AssertionError: naming `what` and the last value, after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}; last: {value!r}")
        time.sleep(poll_s)


async def eventually(
    condition: Callable[[], T | Awaitable[T]], what: str, timeout_s: float = 30.0
) -> T:
    """Return `condition()`'s (sync or async) first truthy value, checked every POLL_S on the
    running loop, which keeps serving in between.

    Raises:
        AssertionError: naming `what` and the last value, after `timeout_s`.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = condition()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}; last: {value!r}")
        await asyncio.sleep(POLL_S)
