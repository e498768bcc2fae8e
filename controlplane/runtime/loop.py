"""`Runtime`: the asyncio driver of the policy, and the API layer's only way into it.

The event loop collects submits, cancels, agent reports and membership changes (the callers
waiting in `Waiters`, the rest in the `Inbox`); a single tick thread applies them
(controlplane/runtime/ticker.py: observe -> schedule -> one transaction); after the commit
the loop acknowledges submits, publishes tokens to Generate streams and sends commands to
agents. While a tick runs, new submits pile up and go into the
next tick's transaction together (group commit). Reads (Get of finished requests, List,
tokens of finished requests) run on a small reader pool and never wait for a tick.

A failed tick never stops the process. Its transaction rolled back, but the policy had already
observed it, so the runtime rebuilds policy and state from the database exactly as a restart
does (controlplane/runtime/recovery.py), retrying with back-off while the database is away
(`serving` is False meanwhile, and health says NOT_SERVING). Agents are detached (they
reconnect and register again, their work re-queued). The failed tick's submits and cancels
wait and go into the first tick after the rebuild (a submit whose row did commit is found
there and acknowledged once); a submit whose second attempt fails as well gets UNAVAILABLE.

The roles around the loop live apart: the submit bounds in admission.py, the waiting callers
in waiters.py, the next tick's inputs in inbox.py, the committed state readers see in
published.py; the tick half is ticker.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from controlplane.config import Config
from controlplane.core.policies.registry import make_policy
from controlplane.core.policy import Policy
from controlplane.core.types import ClusterView, RequestView
from controlplane.runtime.admission import Admission
from controlplane.runtime.agents import AgentRegistry, AgentSession, Registration
from controlplane.runtime.clock import Clock
from controlplane.runtime.commands import AgentCommand
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.runtime.inbox import Inbox
from controlplane.runtime.inputs import (
    CancelAsk,
    NodeJoin,
    PendingSubmit,
    SubmitOutcome,
    TickInput,
    TickOutput,
)
from controlplane.runtime.metrics import Metrics
from controlplane.runtime.published import Published
from controlplane.runtime.recovery import recover
from controlplane.runtime.reports import AgentReport
from controlplane.runtime.state import RuntimeState
from controlplane.runtime.ticker import Ticker
from controlplane.runtime.tokens import TokenLog
from controlplane.runtime.waiters import Taken, Waiters
from controlplane.store.errors import StoreError
from controlplane.store.records import ListOrder, RequestFilter, RequestPage
from controlplane.store.repository import Repository
from controlplane.telemetry import ATTR_NODE_ID, SPAN_DISPATCH, Telemetry, TraceContext

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
SNAPSHOT_PERIOD_S = 1.0  # cluster snapshot (metrics gauges) refresh period
REBUILD_BASE_S = 0.05  # first wait before retrying a rebuild from the database
REBUILD_MAX_S = 2.0  # longest wait between rebuild attempts


class Runtime:
    """Drives the policy; see the module docstring. Create, `await start()`, `await stop()`."""

    def __init__(
        self,
        settings: Config,
        policy: Policy,
        repo: Repository,
        telemetry: Telemetry,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.repo = repo
        self.telemetry = telemetry
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.agents = AgentRegistry(settings.model)
        self._state = RuntimeState()
        self._ticker = Ticker(
            policy, repo, self._state, telemetry, transfer_timeout_s=settings.kv_transfer_timeout_s
        )
        self._tick_pool = ThreadPoolExecutor(1, thread_name_prefix="pecsched-tick")
        self._read_pool = ThreadPoolExecutor(4, thread_name_prefix="pecsched-read")
        self.waiters = Waiters()  # callers waiting for a tick
        self.admission = Admission(settings)
        self.inbox = Inbox(settings.heartbeat_interval_s)  # reports, joins, leaves, cancels
        self.published = Published(self.metrics)  # committed state the readers see
        self._snapshot: ClusterView | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # False until start() recovered, and while rebuilding after a failed tick: calls are
        # accepted meanwhile and wait for the ticks to run.
        self.serving = False
        self.metrics.serving.set(0)
        self.serving_listeners: list[Callable[[bool], None]] = []  # called on each change
        self._serving_event = asyncio.Event()
        self.stopped = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Recover unfinished requests from the database and start ticking; returns how many."""
        logs, views = await self._in_tick_thread(recover, self._ticker, self.clock.now_s())
        self._install(self._ticker, logs, views)
        self._task = asyncio.create_task(self._run(), name="pecsched-runtime")
        self._set_serving(True)
        return len(logs)

    async def until_serving(self) -> None:
        """Return once the runtime serves (started, and not rebuilding).

        Raises:
            RuntimeServiceError: SHUTTING_DOWN when it stops first.
        """
        waits = [asyncio.ensure_future(e.wait()) for e in (self._serving_event, self.stopped)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._check_open()

    async def stop(self) -> None:
        """Stop ticking (pending submits fail with SHUTTING_DOWN) and close agent streams."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for session in self.agents.sessions():
            self.agents.lose(session, "control plane stopping")
        self.waiters.fail_all(RuntimeServiceError(RuntimeErrorCode.SHUTTING_DOWN, "shutting down"))
        self._tick_pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=False)
        self.stopped.set()

    # ---- client side -----------------------------------------------------------------------

    async def submit(self, pending: PendingSubmit) -> SubmitOutcome:
        """Persist and queue a request; returns after the commit.

        Raises:
            RuntimeServiceError: QUEUE_FULL / TENANT_LIMIT / PROMPT_BUDGET (with
                retry_after_s; see Admission), SHUTTING_DOWN.
            StoreError: the database failed (the request was not accepted).
        """
        self._check_open()
        self.admission.check(pending.new.spec)
        future = self.waiters.submit(pending)
        self.admission.count_pending(pending.new.spec, +1)
        self._wake.set()
        return await future

    async def cancel(self, request_id: str, reason: str) -> RequestView:
        """Cancel an unfinished request (no-op for a finished one); returns its committed view.

        Raises:
            StoreError: NotFound when no such request exists.
        """
        self._check_open()
        future = self.waiters.cancel(request_id)
        self.inbox.add(CancelAsk(request_id, reason))
        self._wake.set()
        view = await future
        return view if view is not None else await self.get(request_id)

    async def get(self, request_id: str) -> RequestView:
        """The committed view of a request.

        Raises:
            StoreError: NotFound when no such request exists.
        """
        view = self.published.views.get(request_id)
        if view is not None:
            return view
        return await self._read(self.repo.get_request, request_id)

    def token_log(self, request_id: str) -> TokenLog | None:
        """The live output log of an unfinished request (None once finished or unknown)."""
        return self.published.logs.get(request_id)

    async def read_tokens(self, request_id: str, from_index: int) -> tuple[int, ...]:
        """Stored output tokens of a request from `from_index` on."""
        return await self._read(self.repo.get_output_tokens, request_id, from_index)

    async def list_requests(
        self, request_filter: RequestFilter, page_size: int, page_token: str, order: ListOrder
    ) -> RequestPage:
        """One page of stored requests in `order` (see Repository.list_requests)."""

        def run() -> RequestPage:
            return self.repo.list_requests(
                request_filter, page_size=page_size, page_token=page_token, order=order
            )

        return await self._read(run)

    async def cluster_view(self) -> ClusterView:
        """A cluster snapshot taken by the next tick."""
        self._check_open()
        future = self.waiters.snapshot()
        self._wake.set()
        return await future

    def throughput_rps(self) -> float:
        """Requests finished per second over the last minute."""
        return self.published.throughput_rps(self.clock.now_s())

    # ---- agent side ------------------------------------------------------------------------

    def attach(self, registration: Registration, join: NodeJoin) -> AgentSession:
        """Register an agent; its instances come up at the next tick.

        Raises:
            RuntimeServiceError: AGENT_REJECTED (model mismatch, instance held elsewhere).
        """
        self._check_open()
        session, leave = self.agents.attach(registration, self.clock.now_s())
        if leave is not None:
            self.inbox.add(leave)
        self.inbox.add(join)
        self._wake.set()
        return session

    def detach(self, session: AgentSession, reason: str) -> None:
        """The agent's stream ended: its work is re-queued at the next tick."""
        leave = self.agents.lose(session, reason)
        if leave is not None:
            self.inbox.add(leave)
            self._wake.set()

    def heard_from(self, session: AgentSession) -> None:
        """Any message from the agent proves it alive (persisted once per heartbeat period)."""
        now = self.clock.now_s()
        session.last_seen_s = now
        self.inbox.heard_from(session.node_id, now)

    def report(self, session: AgentSession, report: AgentReport) -> None:
        """An event from a live agent about one request (applied at the next tick; repeated
        retryable failures back off in the policy: ClusterState.remember_refusal)."""
        if session.is_live and not self._stopping:
            self.inbox.add(report)
            self._wake.set()

    def record_busy(self, instance_id: str, busy_s: float) -> None:
        """Busy seconds an agent reported for one instance (metrics)."""
        if busy_s > 0:
            self.metrics.busy.inc(busy_s, instance=instance_id)

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.settings.tick_interval_s
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._wake.clear()
            now = self.clock.now_s()
            for session in self.agents.expired(now, self.settings.heartbeat_interval_s):
                self.detach(session, "missed 3 heartbeats")
            tick, taken = self._take_inputs(now)
            started = time.perf_counter()
            try:
                out = await self._in_tick_thread(self._ticker.run, tick)
            except Exception as exc:  # the policy and the database may now disagree
                await self._rebuild(exc, tick, taken)
                continue
            self.metrics.tick.observe(time.perf_counter() - started)
            self._apply(out, taken, now)
            if self.waiters.submits or self.inbox.happenings:
                self._wake.set()

    def _take_inputs(self, now: float) -> tuple[TickInput, Taken]:
        taken = self.waiters.take(self.settings.max_submits_per_tick)
        for pending, _ in taken.submits:
            self.admission.count_pending(pending.new.spec, -1)
        happenings, heartbeats = self.inbox.take()
        tick = TickInput(
            now_s=now,
            submits=[p for p, _ in taken.submits],
            happenings=happenings,
            heartbeats=heartbeats,
            want_snapshot=self.waiters.want_snapshot
            or self._snapshot is None
            or now - self._snapshot.at_s >= SNAPSHOT_PERIOD_S,
        )
        return tick, taken

    def _apply(self, out: TickOutput, taken: Taken, now: float) -> None:
        self.published.logs.update(out.new_logs)
        for view in out.views:
            self.published.settle(view, now)
        self.published.publish_tokens(out.touched_logs)
        self.admission.committed(out.num_active, out.tenant_active, out.tenant_prompt_bytes)
        self.metrics.prompt_bytes.set(sum(out.tenant_prompt_bytes.values()))
        for outcome in out.submits:
            result = "refused" if outcome.view is None else "created"
            if outcome.view is not None and not outcome.created:
                result = "deduplicated"
            self.metrics.submits.inc(result=result)
            if outcome.view is not None and outcome.created:
                view = outcome.view
                self.metrics.tokens.inc(
                    view.spec.prompt_tokens, request_class=view.request_class.value, kind="prompt"
                )
        self.waiters.answer(taken, out.submits, out.cancels, out.snapshot)
        for command in out.commands:
            self._dispatch(command)
        if out.snapshot is not None:
            self._snapshot = out.snapshot
            self.published.update_gauges(out.snapshot, len(self.agents.sessions()))
        if out.num_actions:
            self.metrics.decision.observe(out.decision_s)

    def _dispatch(self, command: AgentCommand) -> None:
        session = self.agents.session(command.node_id)
        if session is None:
            return  # the node is gone; its leave re-queues the work
        span = self.telemetry.start_span(
            SPAN_DISPATCH,
            parent=command.trace,
            attributes={ATTR_NODE_ID: command.node_id},
        )
        session.send(_with_trace(command, span.context))
        span.end()

    async def _rebuild(self, exc: Exception, tick: TickInput, taken: Taken) -> None:
        """Rebuild policy and state from the database after a failed tick (module docstring)."""
        _log.error("tick failed and rolled back; rebuilding from the database: %r", exc)
        self.metrics.rebuilds.inc()
        self._set_serving(False)
        self._requeue(exc, tick, taken)
        for session in self.agents.sessions():
            self.agents.lose(session, "control plane rebuilding its state")
        self.inbox.keep_only_cancels()
        delay_s = REBUILD_BASE_S
        while not self._stopping:
            policy = make_policy(self.policy.name, self.policy.config, self.settings.seed)
            ticker = Ticker(
                policy,
                self.repo,
                RuntimeState(),
                self.telemetry,
                transfer_timeout_s=self.settings.kv_transfer_timeout_s,
            )
            try:
                logs, views = await self._in_tick_thread(recover, ticker, self.clock.now_s())
            except Exception as retry_exc:
                _log.warning("rebuild failed (%r); retrying in %.2f s", retry_exc, delay_s)
                try:
                    await asyncio.wait_for(self._wake_on_stop(), delay_s)
                except TimeoutError:
                    pass
                delay_s = min(2 * delay_s, REBUILD_MAX_S)
                continue
            self._install(ticker, logs, views)
            _log.warning("rebuilt from the database: %d unfinished requests", len(logs))
            self._set_serving(True)
            self._wake.set()
            return

    def _requeue(self, exc: Exception, tick: TickInput, taken: Taken) -> None:
        """Put a failed tick's submits and cancels back in front of the queue, once
        (Waiters.put_back)."""
        error: Exception = (
            exc
            if isinstance(exc, StoreError)
            else RuntimeServiceError(
                RuntimeErrorCode.REBUILDING, "the control plane could not commit the request"
            )
        )
        again = self.waiters.put_back(taken, error)
        for pending, _ in again.submits:
            self.admission.count_pending(pending.new.spec, +1)
        ids = {rid for rid, _ in again.cancels}
        self.inbox.put_back(
            h for h in tick.happenings if isinstance(h, CancelAsk) and h.request_id in ids
        )

    def _install(self, ticker: Ticker, logs: dict[str, TokenLog], views: list[RequestView]) -> None:
        """Make a recovered ticker current: readers follow the recovered token logs."""
        old_logs = self.published.logs
        self._ticker, self._state, self.policy = ticker, ticker.state, ticker.policy
        self.published.logs = dict(logs)
        self.published.views.clear()
        for view in views:
            if not view.state.is_terminal:
                self.published.views[view.request_id] = view
        for log in old_logs.values():
            log.retire()
        self.admission.committed(
            self.policy.num_active_requests(),
            dict(self._state.tenant_active),
            dict(self._state.tenant_prompt_bytes),
        )

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self.metrics.serving.set(int(serving))
            if serving:
                self._serving_event.set()
            else:
                self._serving_event.clear()
            for listener in self.serving_listeners:
                listener(serving)

    async def _wake_on_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    # ---- helpers ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopping:
            raise RuntimeServiceError(
                RuntimeErrorCode.SHUTTING_DOWN, "the control plane is shutting down"
            )

    async def _in_tick_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._tick_pool, fn, *args)

    async def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)


def _with_trace(command: AgentCommand, trace: TraceContext) -> AgentCommand:
    return replace(command, trace=trace)
