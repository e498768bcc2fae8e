"""What readers see: committed views and token logs of unfinished requests, and the metrics
updated when a tick's results are published (event-loop side of the runtime)."""

from __future__ import annotations

from collections import Counter, deque

from controlplane.core.types import ClusterView, RequestState, RequestView
from controlplane.runtime.metrics import Metrics
from controlplane.runtime.tokens import TokenLog

THROUGHPUT_WINDOW_S = 60.0


class Published:
    """Committed state of unfinished requests; updated only after a tick commits."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.logs: dict[str, TokenLog] = {}  # unfinished requests' output (committed part)
        self.views: dict[str, RequestView] = {}  # committed views of unfinished requests
        self.finished_at: deque[float] = deque()  # finish times within the window

    def settle(self, view: RequestView, now: float) -> RequestView | None:
        """Record a committed view (metrics, final state of its log); returns the previous."""
        rid = view.request_id
        previous = self.views.get(rid)
        label = view.request_class.value
        spec = view.spec
        if view.first_scheduled_s is not None and (
            previous is None or previous.first_scheduled_s is None
        ):
            self.metrics.queueing_delay.observe(
                max(0.0, view.first_scheduled_s - spec.arrival_s), request_class=label
            )
        if view.first_token_s is not None and (previous is None or previous.first_token_s is None):
            self.metrics.ttft.observe(
                max(0.0, view.first_token_s - spec.arrival_s), request_class=label
            )
        made = view.output_tokens - (previous.output_tokens if previous is not None else 0)
        if made > 0:
            self.metrics.tokens.inc(made, request_class=label, kind="output")
        if not view.state.is_terminal:
            self.views[rid] = view
            return previous
        self.views.pop(rid, None)
        log = self.logs.pop(rid, None)
        if log is not None:
            log.final_state = view.state
            log.error = view.error
            log.publish()
        if view.state is RequestState.FINISHED:
            self.finished_at.append(now)
            self.metrics.jct.observe(max(0.0, now - spec.arrival_s), request_class=label)
        return previous

    def publish_tokens(self, request_ids: list[str]) -> None:
        """Make the tokens appended by the tick durable for readers, and wake them."""
        for rid in request_ids:
            log = self.logs.get(rid)
            if log is not None:
                log.publish()

    def update_gauges(self, view: ClusterView, num_agents: int) -> None:
        """Refresh the gauges from a cluster snapshot."""
        m = self.metrics
        for stats in view.classes:
            label = stats.request_class.value
            m.queue_depth.set(stats.queued, request_class=label)
            m.queued_tokens.set(stats.queued_tokens, request_class=label)
            for state in ("prefilling", "paused", "transferring_kv", "decoding"):
                m.requests.set(getattr(stats, state), request_class=label, state=state)
        m.preemptions.set(view.preemptions_total)
        m.colocations.set(view.colocations_total)
        m.kv_transfers.set(view.kv_transfers_total)
        m.agents.set(num_agents)
        roles: Counter[str] = Counter(i.role.value for i in view.instances)
        for role, count in roles.items():
            m.instances.set(count, role=role)

    def throughput_rps(self, now: float) -> float:
        """Requests finished per second over the last minute."""
        while self.finished_at and self.finished_at[0] < now - THROUGHPUT_WINDOW_S:
            self.finished_at.popleft()
        return len(self.finished_at) / THROUGHPUT_WINDOW_S
