"""`Driver`: the tick loop of the `Runtime` (controlplane/runtime/loop.py) and its rebuild.

Each turn takes the waiting callers (`Waiters`) and the `Inbox`, runs one tick on the tick
thread (controlplane/runtime/ticker.py: observe -> schedule -> one transaction), and after the
commit acknowledges submits, publishes tokens and sends commands to agents. A failed tick
rebuilds policy and state from the database as a restart does, retrying with back-off while
the database is away (`serving` is False meanwhile); the Runtime's docstring tells the rest.
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
from controlplane.runtime.agents import AgentRegistry, AgentSession
from controlplane.runtime.clock import Clock
from controlplane.runtime.commands import AgentCommand
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.runtime.inbox import Inbox
from controlplane.runtime.inputs import CancelAsk, TickInput, TickOutput
from controlplane.runtime.metrics import Metrics
from controlplane.runtime.published import Published
from controlplane.runtime.recovery import recover
from controlplane.runtime.state import RuntimeState
from controlplane.runtime.ticker import Ticker
from controlplane.runtime.tokens import TokenLog
from controlplane.runtime.waiters import Taken, Waiters
from controlplane.store.errors import StoreError
from controlplane.store.repository import Repository
from controlplane.telemetry import ATTR_NODE_ID, SPAN_DISPATCH, Telemetry

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
SNAPSHOT_PERIOD_S = 1.0  # cluster snapshot (metrics gauges) refresh period
REBUILD_BASE_S = 0.05  # first wait before retrying a rebuild from the database
REBUILD_MAX_S = 2.0  # longest wait between rebuild attempts


class Driver:
    """Runs ticks over the Runtime's parts; see the module docstring. `start`, then `stop`
    and `close`; `wake` after adding an input."""

    def __init__(
        self,
        settings: Config,
        policy: Policy,
        repo: Repository,
        telemetry: Telemetry,
        clock: Clock,
        metrics: Metrics,
        *,
        agents: AgentRegistry,
        waiters: Waiters,
        admission: Admission,
        inbox: Inbox,
        published: Published,
    ) -> None:
        self.settings, self.policy, self.repo = settings, policy, repo
        self.telemetry, self.clock, self.metrics = telemetry, clock, metrics
        self.agents, self.waiters, self.admission = agents, waiters, admission
        self.inbox, self.published = inbox, published
        self._state = RuntimeState()
        self._ticker = Ticker(
            policy, repo, self._state, telemetry, transfer_timeout_s=settings.kv_transfer_timeout_s
        )
        self._tick_pool = ThreadPoolExecutor(1, thread_name_prefix="pecsched-tick")
        self._snapshot: ClusterView | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stopping = False
        # False until start() recovered, and while rebuilding after a failed tick: calls are
        # accepted meanwhile and wait for the ticks to run.
        self.serving = False
        self.metrics.serving.set(0)
        self.serving_listeners: list[Callable[[bool], None]] = []  # called on each change
        self.serving_event = asyncio.Event()

    def wake(self) -> None:
        """Run the next tick now (an input arrived)."""
        self._wake.set()

    def detach(self, session: AgentSession, reason: str) -> None:
        """The agent's stream ended: its work is re-queued at the next tick."""
        leave = self.agents.lose(session, reason)
        if leave is not None:
            self.inbox.add(leave)
            self._wake.set()

    async def start(self) -> int:
        """Recover unfinished requests from the database and start ticking; returns how many."""
        logs, views = await self._in_tick_thread(recover, self._ticker, self.clock.now_s())
        self._install(self._ticker, logs, views)
        self._task = asyncio.create_task(self._run(), name="pecsched-runtime")
        self._set_serving(True)
        return len(logs)

    async def stop(self) -> None:
        """Stop ticking; returns once the last tick ended."""
        self.stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def close(self) -> None:
        """Release the tick thread (after `stop`)."""
        self._tick_pool.shutdown(wait=True)

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.settings.tick_interval_s
        while not self.stopping:
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
        session.send(replace(command, trace=span.context))
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
        while not self.stopping:
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
                self.serving_event.set()
            else:
                self.serving_event.clear()
            for listener in self.serving_listeners:
                listener(serving)

    async def _wake_on_stop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            await self._wake.wait()

    # ---- helpers ---------------------------------------------------------------------------

    async def _in_tick_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._tick_pool, fn, *args)
