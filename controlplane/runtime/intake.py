"""Turning agent reports into policy events, stored tokens and timeline entries (tick thread).

A report is applied only when it is about the request's current work: it must come from an
instance of the request's last persisted placement (KV transfer progress is matched by its
transfer id instead). Reports from an earlier attempt (before a re-queue, a restart or an
agent reconnect) are dropped here, because the policy cannot tell attempts apart. A failure
that names no instance is an agent refusing a command that names no single instance (a
StartPrefill, say; a refused StartDecode names its instance): it is about the request's work
on the reporting node, and must reach the policy, or the request would wait forever for work
that never runs.
"""

from __future__ import annotations

import logging

from controlplane.core.events import (
    Event,
    KVTransferDone,
    PrefillChunkDone,
    PrefillDone,
    PrefillPaused,
    RequestFailed,
    RequestFinished,
    TokensGenerated,
)
from controlplane.runtime import reports
from controlplane.runtime.reports import (
    AgentReport,
    Cancelled,
    Failed,
    Finished,
    KvTransferUpdate,
    Paused,
    Tokens,
    TransferState,
)
from controlplane.runtime.state import RuntimeState
from controlplane.store.records import DetailValue, RequestEvent, RequestEventKind

_log = logging.getLogger(__name__)
_K = RequestEventKind


class Intake:
    """Accumulates what one tick's reports mean; read the fields after `add` calls."""

    def __init__(self, state: RuntimeState) -> None:
        self._state = state
        self.events: list[Event] = []  # for policy.observe, in order
        self.timeline: list[RequestEvent] = []  # for repo.record_events
        self.touched: set[str] = set()  # requests whose reports were applied
        self.tokens_added: set[str] = set()  # requests with new output tokens
        self.num_stale = 0  # reports dropped as stale

    def add(self, report: AgentReport) -> bool:
        """Apply one report; False when it was dropped as stale or about an unknown request."""
        st = self._state
        rid = report.request_id
        record = st.requests.get(rid)
        if record is None:
            self.num_stale += 1
            return False
        log = record.log
        at = report.received_s
        body = report.body
        if isinstance(body, KvTransferUpdate):
            return self._transfer(report, body)
        if not self._about_placement(report):
            self.num_stale += 1
            return False
        match body:
            case reports.PrefillChunkDone():
                self.events.append(PrefillChunkDone(rid, body.chunk_index, at))
                details: dict[str, DetailValue] = {
                    "chunk_index": body.chunk_index,
                    "num_chunks": body.chunks_total,
                    "duration_s": body.duration_s,
                }
                if body.iteration:  # one worker iteration: its chunks share it
                    details["iteration"] = body.iteration
                    details["iteration_tokens"] = body.iteration_tokens
                    details["chunk_tokens"] = body.chunk_tokens
                self._note(rid, _K.PREFILL_CHUNK_DONE, at, report.instance_id, details)
            case reports.PrefillDone():
                self.events.append(PrefillDone(rid, at))
                self._note(rid, _K.PREFILL_DONE, at, report.instance_id, {})
                base = len(log.ids) if record.gen_base is None else record.gen_base
                self._tokens(rid, base, (body.first_token_id,), at)
            case Paused():
                self.events.append(PrefillPaused(rid, body.chunks_done, at))
            case Tokens():
                self._tokens(rid, body.start_index, body.token_ids, at)
            case Finished():
                self.events.append(RequestFinished(rid, at))
            case Failed():
                self.events.append(RequestFailed(rid, body.retryable, at, body.error))
                if body.retryable:  # a final failure is recorded with the FAILED state
                    details = {"error": body.error, "retryable": True}
                    self._note(rid, _K.FAILED, at, report.instance_id or None, details)
            case Cancelled():
                pass
        self.touched.add(rid)
        return True

    def _about_placement(self, report: AgentReport) -> bool:
        """The report comes from an instance of the request's placement (a refused command:
        from the node of one)."""
        placement = self._state.requests[report.request_id].placement
        if report.instance_id or not isinstance(report.body, Failed):
            return report.instance_id in placement
        node_of = self._state.instance_node
        return any(node_of.get(iid) == report.node_id for iid in placement)

    def _transfer(self, report: AgentReport, body: KvTransferUpdate) -> bool:
        st = self._state
        info = st.transfers.get(body.transfer_id)
        if info is None or info.request_id != report.request_id:
            self.num_stale += 1
            return False
        if body.state not in (TransferState.DONE, TransferState.FAILED):
            return True
        del st.transfers[body.transfer_id]
        ok = body.state is TransferState.DONE
        rid, dst, at = info.request_id, info.destination_instance_id, report.received_s
        self.events.append(KVTransferDone(rid, dst, ok, at, body.error))
        if ok:
            st.requests[rid].last_transfer = body.transfer_id
            details: dict[str, DetailValue] = {
                "dst": dst,
                "bytes": body.num_bytes,
                "duration_s": body.duration_s,
            }
            self._note(rid, _K.KV_TRANSFER_DONE, at, info.source_instance_id, details)
        else:
            details = {"dst": dst, "error": body.error}
            self._note(rid, _K.KV_TRANSFER_FAILED, at, info.source_instance_id, details)
        self.touched.add(rid)
        return True

    def _tokens(self, rid: str, start_index: int, token_ids: tuple[int, ...], at: float) -> None:
        log = self._state.requests[rid].log
        had = len(log.ids)
        new = log.accept(start_index, token_ids)
        if start_index > had:
            _log.warning(
                "request %s: token chunk at %d skips past %d; dropped", rid, start_index, had
            )
        if not new:
            return
        if had == 0:
            self._note(rid, _K.FIRST_TOKEN, at, None, {})
        self.events.append(TokensGenerated(rid, len(new), at))
        self.tokens_added.add(rid)

    def _note(
        self,
        rid: str,
        kind: RequestEventKind,
        at: float,
        instance_id: str | None,
        details: dict[str, DetailValue],
    ) -> None:
        self.timeline.append(RequestEvent(rid, kind, at, instance_id, details))
