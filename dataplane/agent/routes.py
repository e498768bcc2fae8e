"""The agent's request table: where each request lives on this node, which Cancels are still
unanswered, and which KV transfers this node takes part in. Plain data with no I/O; only the
command router (`dataplane.agent.commands`) and its parts (`prefills`, `transfers`) change it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Route:
    """Where a request lives on this node."""

    workers: set[int]  # worker indices holding (or about to hold) its KV
    offset_tokens: int  # output tokens generated before a re-queue
    prompt_tokens: int  # original prompt length
    paused: bool = False  # last report was Paused
    # SP members here other than rank 0: their progress is rank 0's to report (here, or on
    # another node when all members here are followers); their Finished only retires them
    followers: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """A KV transfer this node takes part in."""

    request_id: str
    source_id: str  # instance id of the sender
    destination_id: str  # instance id of the receiver


@dataclass(slots=True)
class RequestTable:
    """Routes, unanswered Cancels and transfers of the requests this node holds.

    A request has at most one route. A cancelled request has no route but stays in
    `cancelling` until every worker that held it has answered, so the same request id can be
    routed again at once (a re-queue in the same tick) while the old work's reports are told
    apart by worker (`awaits_cancel`).
    """

    routes: dict[str, Route] = field(default_factory=dict)
    cancelling: dict[str, set[int]] = field(default_factory=dict)  # request -> workers to answer
    transfers: dict[str, TransferInfo] = field(default_factory=dict)  # by transfer id
    failed_transfers: set[str] = field(default_factory=set)  # FAILED already reported once

    @property
    def idle(self) -> bool:
        """No request is held and no Cancel is unanswered."""
        return not (self.routes or self.cancelling)

    def resident(self) -> list[str]:
        """Ids of every routed request, sorted."""
        return sorted(self.routes)

    def held_by(self, index: int) -> list[str]:
        """Ids of the routed requests worker `index` holds, sorted."""
        return sorted(rid for rid, route in self.routes.items() if index in route.workers)

    def paused(self) -> list[str]:
        """Ids of the routed requests whose last report was Paused, sorted."""
        return sorted(rid for rid, route in self.routes.items() if route.paused)

    def start_cancel(self, request_id: str, workers: set[int]) -> None:
        """`workers` must each answer a Cancel for `request_id` before it is Cancelled."""
        self.cancelling.setdefault(request_id, set()).update(workers)

    def awaits_cancel(self, request_id: str, index: int) -> bool:
        """Worker `index` has not answered a Cancel for `request_id` yet."""
        return index in self.cancelling.get(request_id, ())

    def cancel_answered(self, request_id: str, index: int) -> bool:
        """Worker `index` answered (or died); True when it was the last one to answer."""
        waiting = self.cancelling.get(request_id)
        if waiting is None or index not in waiting:
            return False
        waiting.discard(index)
        if waiting:
            return False
        del self.cancelling[request_id]
        return True

    def forget_transfers(self) -> None:
        """Drop the transfers of requests without a route: reports about such a request are
        dropped, so nothing reads them any more (they would only grow)."""
        self.transfers = {t: i for t, i in self.transfers.items() if i.request_id in self.routes}
        self.failed_transfers &= self.transfers.keys()

    def release(self, request_id: str, index: int) -> None:
        """Worker `index` no longer holds the request; the route goes when nobody does."""
        route = self.routes[request_id]
        route.workers.discard(index)
        if not route.workers:
            del self.routes[request_id]
