"""The `Policy` protocol: the only surface runtime/ and sim/ drive.

A driver loops: collect what happened -> `observe(events)` -> `schedule(now_s)` -> carry out the
Decision's actions -> repeat. Both drivers make identical calls, so a simulated run and a live
run with the same events and seed produce the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from controlplane.core.actions import Decision
from controlplane.core.config import SchedulerConfig
from controlplane.core.events import Event
from controlplane.core.types import AdmissionVerdict, ClusterView, RequestSpec, RequestView


class Policy(Protocol):
    """A scheduling policy: pure, deterministic for the same events, calls and seed."""

    @property
    def name(self) -> str:
        """Registry name, e.g. "pecsched" or "fifo"."""
        ...

    @property
    def config(self) -> SchedulerConfig:
        """The effective configuration (the policy's fixed settings applied)."""
        ...

    def observe(self, events: Sequence[Event]) -> None:
        """Apply what happened, in order, to the policy's bookkeeping.

        Args:
            events: events in the order they happened.

        Raises:
            IllegalTransitionError: an event contradicts a live request's lifecycle.
            CoreError: duplicate request or instance ids (DUPLICATE_*), or an event about an
                unknown instance (UNKNOWN_INSTANCE).

        Emits no actions; a request that can never fit is rejected by the next `schedule`.
        """
        ...

    def schedule(self, now_s: float) -> Decision:
        """Decide what to start, pause, resume, transfer, decode, cancel or reject now.

        Args:
            now_s: the driver's current time, never earlier than the previous call's.

        Returns:
            The actions to carry out, in order. Their effects on states and KV are already
            applied to the policy's bookkeeping when this returns. Work is proportional to
            what changed since the previous call, not to the queue or cluster size.
        """
        ...

    def check_admission(self, spec: RequestSpec) -> AdmissionVerdict:
        """Say whether the cluster, as it is now, could ever hold `spec`.

        Pure: changes nothing. The API layer uses it to refuse prompts the cluster can never
        hold (INVALID_ARGUMENT) before accepting them. An empty cluster admits everything.
        """
        ...

    def request_view(self, request_id: str) -> RequestView:
        """Snapshot of one tracked request.

        Raises:
            CoreError: UNKNOWN_REQUEST when it was never seen or was taken by `take_completed`.
        """
        ...

    def cluster_view(self, now_s: float) -> ClusterView:
        """Snapshot of queues and instances; O(instances), meant for Watch and metrics."""
        ...

    def num_active_requests(self) -> int:
        """Requests not yet terminal (queued or running)."""
        ...

    def take_completed(self) -> tuple[RequestView, ...]:
        """Views of requests that became terminal since the previous call; forgets them.

        Lets long runs keep memory bounded; events about forgotten requests are ignored.
        """
        ...
