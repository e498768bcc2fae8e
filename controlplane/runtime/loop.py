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

The roles live apart: this module is the edge the API calls (lifecycle, client side, agent
side); the loop and its rebuild are driver.py; the submit bounds are admission.py, the waiting
callers waiters.py, the next tick's inputs inbox.py, the committed state readers see
published.py; the tick half is ticker.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from controlplane.config import Config
from controlplane.core.policy import Policy
from controlplane.core.types import ClusterView, RequestView
from controlplane.runtime.admission import Admission
from controlplane.runtime.agents import AgentRegistry, AgentSession, Registration
from controlplane.runtime.clock import Clock
from controlplane.runtime.driver import Driver
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.runtime.inbox import Inbox
from controlplane.runtime.inputs import CancelAsk, NodeJoin, PendingSubmit, SubmitOutcome
from controlplane.runtime.metrics import Metrics
from controlplane.runtime.published import Published
from controlplane.runtime.reports import AgentReport
from controlplane.runtime.tokens import TokenLog
from controlplane.runtime.waiters import Waiters
from controlplane.store.records import ListOrder, RequestFilter, RequestPage
from controlplane.store.repository import Repository
from controlplane.telemetry import Telemetry

_T = TypeVar("_T")


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
        self.repo = repo
        self.telemetry = telemetry
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.agents = AgentRegistry(settings.model)
        self._read_pool = ThreadPoolExecutor(4, thread_name_prefix="pecsched-read")
        self.waiters = Waiters()  # callers waiting for a tick
        self.admission = Admission(settings)
        self.inbox = Inbox(settings.heartbeat_interval_s)  # reports, joins, leaves, cancels
        self.published = Published(self.metrics)  # committed state the readers see
        self._driver = Driver(
            settings,
            policy,
            repo,
            telemetry,
            clock,
            self.metrics,
            agents=self.agents,
            waiters=self.waiters,
            admission=self.admission,
            inbox=self.inbox,
            published=self.published,
        )
        self.stopped = asyncio.Event()

    @property
    def policy(self) -> Policy:
        """The current policy (a rebuild replaces it)."""
        return self._driver.policy

    @property
    def serving(self) -> bool:
        """False until start() recovered, and while rebuilding after a failed tick: calls are
        accepted meanwhile and wait for the ticks to run."""
        return self._driver.serving

    @property
    def serving_listeners(self) -> list[Callable[[bool], None]]:
        """Called on each change of `serving`; append to it."""
        return self._driver.serving_listeners

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Recover unfinished requests from the database and start ticking; returns how many."""
        return await self._driver.start()

    async def until_serving(self) -> None:
        """Return once the runtime serves (started, and not rebuilding).

        Raises:
            RuntimeServiceError: SHUTTING_DOWN when it stops first.
        """
        events = (self._driver.serving_event, self.stopped)
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._check_open()

    async def stop(self) -> None:
        """Stop ticking (pending submits fail with SHUTTING_DOWN) and close agent streams."""
        await self._driver.stop()
        for session in self.agents.sessions():
            self.agents.lose(session, "control plane stopping")
        self.waiters.fail_all(RuntimeServiceError(RuntimeErrorCode.SHUTTING_DOWN, "shutting down"))
        self._driver.close()
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
        self._driver.wake()
        return await future

    async def cancel(self, request_id: str, reason: str) -> RequestView:
        """Cancel an unfinished request (no-op for a finished one); returns its committed view.

        Raises:
            StoreError: NotFound when no such request exists.
        """
        self._check_open()
        future = self.waiters.cancel(request_id)
        self.inbox.add(CancelAsk(request_id, reason))
        self._driver.wake()
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
        self._driver.wake()
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
        self._driver.wake()
        return session

    def detach(self, session: AgentSession, reason: str) -> None:
        """The agent's stream ended: its work is re-queued at the next tick."""
        self._driver.detach(session, reason)

    def heard_from(self, session: AgentSession) -> None:
        """Any message from the agent proves it alive (persisted once per heartbeat period)."""
        now = self.clock.now_s()
        session.last_seen_s = now
        self.inbox.heard_from(session.node_id, now)

    def report(self, session: AgentSession, report: AgentReport) -> None:
        """An event from a live agent about one request (applied at the next tick; repeated
        retryable failures back off in the policy: ClusterState.remember_refusal)."""
        if session.is_live and not self._driver.stopping:
            self.inbox.add(report)
            self._driver.wake()

    def record_busy(self, instance_id: str, busy_s: float) -> None:
        """Busy seconds an agent reported for one instance (metrics)."""
        if busy_s > 0:
            self.metrics.busy.inc(busy_s, instance=instance_id)

    # ---- helpers ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._driver.stopping:
            raise RuntimeServiceError(
                RuntimeErrorCode.SHUTTING_DOWN, "the control plane is shutting down"
            )

    async def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)
