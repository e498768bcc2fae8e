"""Retry policy and per-call deadline bookkeeping, shared by the sync and asyncio clients.

The clients own the loop and the sleeping; this module decides *whether* and *how long*:

    budget = CallBudget(policy, timeout_s, rng, label)
    while True:
        try: return call(timeout=budget.attempt_timeout_s())
        except rpc error as e: delay = budget.next_delay_s(e)   # None: raise e
        sleep(delay)

Retried: UNAVAILABLE always (up to `max_attempts`), RESOURCE_EXHAUSTED only when
`retry_resource_exhausted` is set (then the delay is at least the server's `retry_after_s`).
Every other error is final. Only idempotent calls are retried: Get, List, Cancel (cancelling twice
is a no-op), streams (resumed from their position) and Submit (it always carries an idempotency
key, so a retry returns the first request's id).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from sdk.errors import DeadlineExceededError, PecSchedError, ResourceExhaustedError

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how fast a client retries a failed call."""

    # Attempts per call, the first included; 1 disables retries. The default 8 waits about 11 s
    # in total (0.1 + 0.2 + ... + 3.2 + 5 s), enough to ride out a control-plane restart.
    max_attempts: int = 8
    initial_backoff_s: float = 0.1  # delay before the first retry
    max_backoff_s: float = 5.0  # cap on one delay
    backoff_multiplier: float = 2.0  # growth of the delay per failed attempt
    jitter: float = 0.2  # each delay is scaled by a uniform random factor in [1 - jitter, 1]
    retry_resource_exhausted: bool = False  # also retry RESOURCE_EXHAUSTED, honoring retry_after

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "need 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.backoff_multiplier < 1.0:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff_s(self, num_failures: int, rng: random.Random) -> float:
        """Delay after `num_failures` (>= 1) consecutive failed attempts, jitter included."""
        base_s = self.initial_backoff_s * self.backoff_multiplier ** (num_failures - 1)
        return min(base_s, self.max_backoff_s) * (1.0 - self.jitter * rng.random())

    def is_retryable(self, error: PecSchedError) -> bool:
        """True when `error` may be retried under this policy."""
        if error.status == "UNAVAILABLE":
            return True
        return self.retry_resource_exhausted and isinstance(error, ResourceExhaustedError)


class CallBudget:
    """Attempts and remaining time of one logical call (its retries and stream resumptions)."""

    def __init__(
        self, policy: RetryPolicy, timeout_s: float | None, rng: random.Random, label: str
    ) -> None:
        """Start the clock; `timeout_s` None means no deadline; `label` names the call in logs."""
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._policy = policy
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._rng = rng
        self._label = label
        self._num_failures = 0

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def attempt_timeout_s(self) -> float | None:
        """The gRPC timeout for the next attempt; raises DeadlineExceededError if none is left."""
        remaining_s = self.remaining_s()
        if remaining_s is not None and remaining_s <= 0:
            raise DeadlineExceededError(
                "DEADLINE_EXCEEDED", f"call deadline of {self._timeout_s} s passed"
            )
        return remaining_s

    def record_progress(self) -> None:
        """A stream delivered data: the next failure counts as the first again."""
        self._num_failures = 0

    def next_delay_s(self, error: PecSchedError) -> float | None:
        """Seconds to wait before retrying after `error`, or None when it must be raised."""
        self._num_failures += 1
        if not self._policy.is_retryable(error) or self._num_failures >= self._policy.max_attempts:
            return None
        delay_s = self._policy.backoff_s(self._num_failures, self._rng)
        if isinstance(error, ResourceExhaustedError) and error.retry_after_s is not None:
            delay_s = max(delay_s, error.retry_after_s)
        remaining_s = self.remaining_s()
        if remaining_s is not None and delay_s >= remaining_s:
            return None
        _log.debug(
            "%s failed (%s); attempt %d of %d in %.3f s",
            self._label,
            error,
            self._num_failures + 1,
            self._policy.max_attempts,
            delay_s,
        )
        return delay_s
