"""`Waiters`: the callers waiting for a tick (event loop only).

A Submit waits for the commit of its request, a Cancel for the committed view of the request
it cancelled, a cluster view for the next snapshot. Each tick takes the submits (at most a
batch) and the cancels waiting so far (`take`) and answers them after its commit (`answer`).
A failed tick puts its waiters back in front, once (`put_back`): a waiter whose second tick
fails as well gets the error, so a poison input cannot make the runtime rebuild forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from controlplane.core.types import ClusterView, RequestView
from controlplane.runtime.inputs import PendingSubmit, SubmitOutcome

SubmitWaiter = tuple[PendingSubmit, "asyncio.Future[SubmitOutcome]"]
CancelWaiter = tuple[str, "asyncio.Future[RequestView | None]"]  # request id, its waiter


@dataclass(slots=True)
class Taken:
    """The waiters one tick answers."""

    submits: list[SubmitWaiter]
    cancels: list[CancelWaiter]


class Waiters:
    """Futures of the callers waiting for a tick; see the module docstring."""

    def __init__(self) -> None:
        self.submits: list[SubmitWaiter] = []
        self._cancels: list[CancelWaiter] = []
        self._snapshots: list[asyncio.Future[ClusterView]] = []
        self._retried: set[asyncio.Future[Any]] = set()  # waiters of a failed tick

    def submit(self, pending: PendingSubmit) -> asyncio.Future[SubmitOutcome]:
        """Wait for `pending`'s commit."""
        future: asyncio.Future[SubmitOutcome] = asyncio.get_running_loop().create_future()
        self.submits.append((pending, future))
        return future

    def cancel(self, request_id: str) -> asyncio.Future[RequestView | None]:
        """Wait for the tick that applies a cancel of `request_id`."""
        future: asyncio.Future[RequestView | None] = asyncio.get_running_loop().create_future()
        self._cancels.append((request_id, future))
        return future

    def snapshot(self) -> asyncio.Future[ClusterView]:
        """Wait for the next cluster snapshot."""
        future: asyncio.Future[ClusterView] = asyncio.get_running_loop().create_future()
        self._snapshots.append(future)
        return future

    @property
    def want_snapshot(self) -> bool:
        """Whether a caller waits for a snapshot."""
        return bool(self._snapshots)

    def take(self, max_submits: int) -> Taken:
        """The waiters of the next tick: the oldest `max_submits` submits, every cancel."""
        batch = self.submits[:max_submits]
        del self.submits[: len(batch)]
        cancels, self._cancels = self._cancels, []
        return Taken(batch, cancels)

    def answer(
        self,
        taken: Taken,
        outcomes: list[SubmitOutcome],
        cancelled: dict[str, RequestView],
        snapshot: ClusterView | None,
    ) -> None:
        """Answer a committed tick's waiters (`outcomes` in the order of `taken.submits`)."""
        for outcome, (_, future) in zip(outcomes, taken.submits, strict=True):
            self._set(future, outcome)
        for rid, cancel_future in taken.cancels:
            self._set(cancel_future, cancelled.get(rid))
        if snapshot is not None:
            waiters, self._snapshots = self._snapshots, []
            for waiter in waiters:
                self._set(waiter, snapshot)

    def put_back(self, taken: Taken, error: Exception) -> Taken:
        """Queue a failed tick's waiters again in front, once (see the module docstring);
        returns those queued again."""
        again = Taken(
            [(p, f) for p, f in taken.submits if self._retry_once(f, error)],
            [(rid, f) for rid, f in taken.cancels if self._retry_once(f, error)],
        )
        self.submits[:0] = again.submits
        self._cancels[:0] = again.cancels
        return again

    def fail_all(self, error: Exception) -> None:
        """Fail every waiter (the runtime stops)."""
        futures: list[asyncio.Future[Any]] = [f for _, f in self.submits]
        futures += [f for _, f in self._cancels]
        futures += self._snapshots
        self.submits, self._cancels, self._snapshots = [], [], []
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _set(self, future: asyncio.Future[Any], result: Any) -> None:
        self._retried.discard(future)
        if not future.done():
            future.set_result(result)

    def _retry_once(self, future: asyncio.Future[Any], error: Exception) -> bool:
        """Whether to retry a waiter of a failed tick (False: done, or failed with `error`)."""
        if future.done():
            return False
        if future in self._retried:
            self._retried.discard(future)
            future.set_exception(error)
            return False
        self._retried.add(future)
        return True
