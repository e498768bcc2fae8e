"""`Ticker`: one scheduling tick in one database transaction (runs on the tick thread).

    admission check -> INSERT new requests (group commit) -> observe(reports, cancels,
    membership, arrivals) -> schedule(now) -> UPDATE changed requests, append tokens,
    record the timeline -> COMMIT -> (event loop) acknowledge submits, dispatch commands

The policy is touched only here, by one thread, one tick at a time. If anything fails after
the policy has observed the tick's events, the policy and the database disagree: the error
propagates, the transaction rolls back, and the runtime rebuilds policy and state from the
database as a restart does (controlplane/runtime/loop.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from controlplane import telemetry as tm
from controlplane.core.actions import Colocate, Decision, Reject, StartPrefill, action_kind
from controlplane.core.events import (
    Event,
    InstanceDown,
    InstanceUp,
    RequestArrived,
    RequestCancelled,
)
from controlplane.core.policy import Policy
from controlplane.core.types import RequestState, RequestView
from controlplane.runtime import dispatch
from controlplane.runtime.inputs import (
    CancelAsk,
    NodeJoin,
    NodeLeave,
    PendingSubmit,
    SubmitOutcome,
    TickInput,
    TickOutput,
)
from controlplane.runtime.intake import Intake
from controlplane.runtime.reports import AgentReport, KvTransferUpdate, TransferState
from controlplane.runtime.state import RequestInputs, RuntimeState, Tracked, packed_ids
from controlplane.runtime.tokens import TokenLog
from controlplane.store.errors import NotFound
from controlplane.store.records import DetailValue, NewRequest, RequestEvent, RequestEventKind
from controlplane.store.repository import Repository

_S = RequestState
_K = RequestEventKind
_SCHEDULED = (StartPrefill, Colocate, Reject)


class Ticker:
    """Owns the policy and the runtime state; `run(TickInput)` is one tick."""

    def __init__(
        self,
        policy: Policy,
        repo: Repository,
        state: RuntimeState,
        telemetry: tm.Telemetry,
        *,
        transfer_timeout_s: float,
    ) -> None:
        self.policy = policy
        self.repo = repo
        self.state = state
        self.telemetry = telemetry
        self._transfer_timeout_s = transfer_timeout_s
        self._up: set[str] = set()  # instances the policy knows as up

    def run(self, tick: TickInput) -> TickOutput:
        """Apply one tick and commit it; see the module docstring."""
        out = TickOutput()
        now = tick.now_s
        with self.repo.transaction(write=True):
            queued: list[RequestEvent] = []  # recorded with the tick's other timeline entries
            arrivals = self._insert(tick.submits, now, out, queued)
            intake = Intake(self.state)
            events: list[Event] = []
            down = False
            cancelled: set[str] = set()
            for item in tick.happenings:
                if isinstance(item, AgentReport):
                    if intake.add(item):
                        self._report_span(item)
                elif isinstance(item, CancelAsk):
                    self._flush(intake, events)
                    if item.request_id in self.state.requests:
                        events.append(RequestCancelled(item.request_id, now, item.reason))
                        cancelled.add(item.request_id)
                elif isinstance(item, NodeJoin):
                    self._flush(intake, events)
                    self._join(item, now, events)
                else:
                    self._flush(intake, events)
                    down |= self._leave(item, now, events)
            self._flush(intake, events)
            self._expire_transfers(now, intake)
            self._flush(intake, events)
            events.extend(arrivals)
            self._touch(tick.heartbeats)
            self.policy.observe(events)
            started = time.perf_counter()
            decision = self.policy.schedule(now)
            out.decision_s = time.perf_counter() - started
            out.num_actions = len(decision.actions)
            intake.timeline[:0] = queued
            self._persist(tick, decision, intake, down, cancelled, out)
        out.num_active = self.policy.num_active_requests()
        out.tenant_active = dict(self.state.tenant_active)
        out.tenant_prompt_bytes = dict(self.state.tenant_prompt_bytes)
        return out

    # ---- inputs ----------------------------------------------------------------------------

    def _insert(
        self,
        submits: Sequence[PendingSubmit],
        now: float,
        out: TickOutput,
        timeline: list[RequestEvent],
    ) -> list[Event]:
        admitted: list[PendingSubmit] = []
        outcomes: list[SubmitOutcome | None] = []
        for pending in submits:
            rid = pending.new.spec.request_id
            if rid in self.state.requests:  # retried after a failed tick that did commit it
                outcomes.append(SubmitOutcome(self.policy.request_view(rid), True))
                continue
            verdict = self.policy.check_admission(pending.new.spec)
            outcomes.append(None if verdict.ok else SubmitOutcome(None, False, verdict.reason))
            if verdict.ok:
                admitted.append(pending)
        results = self.repo.add_requests([p.new for p in admitted]) if admitted else []
        arrivals: list[Event] = []
        fresh: dict[str, NewRequest] = {}
        by_id = iter(zip(admitted, results, strict=True))
        for i, outcome in enumerate(outcomes):
            if outcome is not None:
                continue
            pending, result = next(by_id)
            outcomes[i] = SubmitOutcome(result.view, result.created)
            rid = result.view.request_id
            if not result.created and not self._same_content(pending.new, result.view):
                outcomes[i] = SubmitOutcome(None, False, "", key_reused=True)
            if not result.created or rid in fresh:
                continue
            new = pending.new
            fresh[rid] = new
            spec = new.spec
            inputs = RequestInputs(
                spec.tenant, packed_ids(new.prompt_token_ids), spec.max_new_tokens, new.sampling
            )
            log = TokenLog([], spec.max_new_tokens)
            self.state.track(rid, Tracked(inputs, log, trace=pending.trace))
            out.new_logs[rid] = log
            arrivals.append(RequestArrived(spec, now))
            details: dict[str, DetailValue] = {
                "request_class": new.request_class.value,
                "prompt_tokens": spec.prompt_tokens,
            }
            timeline.append(RequestEvent(rid, _K.QUEUED, now, None, details))
        out.submits = [o for o in outcomes if o is not None]
        return arrivals

    def _same_content(self, new: NewRequest, stored: RequestView) -> bool:
        """Whether a replayed idempotency key asks for the stored request again: same prompt,
        max_new_tokens, sampling and priority (the deadline may differ between retries)."""
        spec = stored.spec
        if (spec.max_new_tokens, spec.priority, spec.prompt_tokens) != (
            new.spec.max_new_tokens,
            new.spec.priority,
            new.spec.prompt_tokens,
        ):
            return False
        inputs = self.repo.get_request_inputs(stored.request_id)
        return inputs.sampling == new.sampling and inputs.prompt_token_ids == tuple(
            new.prompt_token_ids
        )

    def _flush(self, intake: Intake, events: list[Event]) -> None:
        """Move the intake's events so far into `events` (keeps the happenings' order)."""
        events.extend(intake.events)
        intake.events.clear()

    def _join(self, join: NodeJoin, now: float, events: list[Event]) -> None:
        st = self.state
        self.repo.upsert_node(join.node)
        st.rendezvous[join.node.node_id] = join.rendezvous_address
        for record in join.instances:
            iid = record.spec.instance_id
            if iid in self._up:  # defensive: the registry sends a leave first
                events.append(InstanceDown(iid, now, "re-registered"))
            self.repo.upsert_instance(record)
            st.instance_node[iid] = join.node.node_id
            self._up.add(iid)
            events.append(InstanceUp(record.spec, now))

    def _leave(self, leave: NodeLeave, now: float, events: list[Event]) -> bool:
        try:
            self.repo.mark_node_down(leave.node_id, now)
        except NotFound:
            pass
        lost = frozenset(leave.instance_ids)
        for iid in leave.instance_ids:
            if iid in self._up:
                self._up.discard(iid)
                self.state.instance_node.pop(iid, None)
                events.append(InstanceDown(iid, now, leave.reason))
        # The policy settles transfers from or to a lost instance on InstanceDown (re-queue,
        # or another destination): a later report or expiry of one would hit the next attempt.
        self.state.forget_transfers(
            lambda info: info.source_instance_id in lost or info.destination_instance_id in lost
        )
        return True

    def _expire_transfers(self, now: float, intake: Intake) -> None:
        """Fail KV transfers no agent reported on within their timeout (plus grace)."""
        st = self.state
        for transfer_id, info in list(st.transfers.items()):
            if info.expires_s <= now:
                report = AgentReport(
                    "",
                    info.request_id,
                    info.source_instance_id,
                    KvTransferUpdate(
                        transfer_id,
                        TransferState.FAILED,
                        info.destination_instance_id,
                        0,
                        0.0,
                        "no transfer report within the timeout",
                    ),
                    now,
                )
                intake.add(report)

    def _touch(self, heartbeats: dict[str, float]) -> None:
        for node_id, at_s in heartbeats.items():
            try:
                self.repo.touch_node(node_id, at_s)
            except NotFound:
                pass

    # ---- effects ---------------------------------------------------------------------------

    def _persist(
        self,
        tick: TickInput,
        decision: Decision,
        intake: Intake,
        down: bool,
        cancelled: set[str],
        out: TickOutput,
    ) -> None:
        st, now = self.state, tick.now_s
        completed = {v.request_id: v for v in self.policy.take_completed()}
        dirty = intake.touched | cancelled | set(completed)
        dirty.update(a.request_id for a in decision.actions)
        if down:  # an instance died: any running request may have been re-queued
            dirty.update(r for r, t in st.requests.items() if t.state is not _S.QUEUED)
        views: dict[str, RequestView] = {}
        for rid in dirty:
            view = completed.get(rid)
            if view is None:
                if rid not in st.requests:
                    continue
                view = self.policy.request_view(rid)
            views[rid] = st.with_carryover(view)
        timeline = list(intake.timeline)
        self._decide(tick, decision, views, timeline, out)
        for rid, view in views.items():
            record = st.requests.get(rid)
            requeued = view.num_requeues - (record.num_requeues if record else view.num_requeues)
            for _ in range(max(0, requeued)):  # may be placed again within the same tick
                timeline.append(RequestEvent(rid, _K.REQUEUED, now, None, {"reason": "requeued"}))
            if view.state is _S.FINISHED:
                details: dict[str, DetailValue] = {"output_tokens": view.output_tokens}
                timeline.append(RequestEvent(rid, _K.FINISHED, now, None, details))
            elif view.state is _S.CANCELLED:
                details = {"reason": view.error}
                timeline.append(RequestEvent(rid, _K.CANCELLED, now, None, details))
            elif view.state is _S.FAILED:
                details = {"error": view.error, "retryable": False}
                timeline.append(RequestEvent(rid, _K.FAILED, now, None, details))
        self.repo.update_requests(list(views.values()))
        for rid in sorted(intake.tokens_added):
            log = st.requests[rid].log
            if len(log.ids) > log.committed:
                self.repo.append_output_tokens(rid, log.committed, log.ids[log.committed :])
        self.repo.record_events(timeline)
        out.touched_logs = sorted(intake.tokens_added)
        out.cancels = {rid: views[rid] for rid in cancelled if rid in views}
        for view in views.values():
            st.settle(view)
        out.views = list(views.values())
        if tick.want_snapshot:
            out.snapshot = self.policy.cluster_view(now)

    def _decide(
        self,
        tick: TickInput,
        decision: Decision,
        views: dict[str, RequestView],
        timeline: list[RequestEvent],
        out: TickOutput,
    ) -> None:
        if decision.is_empty:
            return
        st, now = self.state, tick.now_s
        sched = self.telemetry.start_span(
            tm.SPAN_SCHEDULE,
            start_s=now,
            attributes={
                tm.ATTR_POLICY: self.policy.name,
                tm.ATTR_NUM_ACTIONS: len(decision.actions),
                tm.ATTR_DECISION_S: out.decision_s,
            },
        )
        for action in decision.actions:
            rid = action.request_id
            view = views.get(rid)
            record = st.requests.get(rid)
            parent = record.trace if record is not None else None
            if isinstance(action, _SCHEDULED) and view is not None and record is not None:
                if record.state is _S.QUEUED and view.num_requeues == 0:
                    queue = self.telemetry.start_span(
                        tm.SPAN_QUEUE,
                        parent=parent,
                        start_s=view.spec.arrival_s,
                        attributes={tm.ATTR_REQUEST_ID: rid, tm.ATTR_REASON: action.reason},
                    )
                    queue.end(now)
            span = self.telemetry.start_span(
                f"{tm.SPAN_DECISION}.{action_kind(action).value}",
                parent=parent,
                attributes={
                    tm.ATTR_REQUEST_ID: rid,
                    tm.ATTR_ACTION: action_kind(action).value,
                    tm.ATTR_REASON: action.reason,
                    tm.ATTR_INSTANCE_IDS: dispatch.action_instances(action),
                },
            )
            if record is not None:
                out.commands.extend(
                    dispatch.commands_for(
                        action,
                        st,
                        sp_kind=self.policy.config.sp_kind,
                        transfer_timeout_s=self._transfer_timeout_s,
                        now_s=now,
                        trace=span.context,
                    )
                )
            span.end()
            entry = dispatch.timeline_for(action, view, now)
            if entry is not None:
                timeline.append(entry)
        sched.end()

    def _report_span(self, report: AgentReport) -> None:
        kind = type(report.body).__name__
        if kind == "Tokens":
            return
        span = self.telemetry.start_span(
            f"{tm.SPAN_AGENT_EVENT}.{kind}",
            parent=self._trace_of(report.request_id),
            attributes={
                tm.ATTR_REQUEST_ID: report.request_id,
                tm.ATTR_EVENT: kind,
                tm.ATTR_NODE_ID: report.node_id,
                tm.ATTR_INSTANCE_IDS: [report.instance_id],
            },
        )
        span.end()

    def _trace_of(self, request_id: str) -> tm.TraceContext | None:
        record = self.state.requests.get(request_id)
        return record.trace if record is not None else None
