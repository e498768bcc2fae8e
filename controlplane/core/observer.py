"""Applying events to a `ClusterState` (the body of `Policy.observe`).

Events about requests that are unknown (forgotten by take_completed) or terminal are ignored:
they are races such as a token report crossing a cancel. Stale progress reports (a chunk done
for a request that was re-queued meanwhile) are ignored too; `stats["ignored_events"]` counts
both.
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane.core import lifecycle
from controlplane.core.errors import CoreError, ErrorCode
from controlplane.core.events import (
    Event,
    InstanceDown,
    InstanceUp,
    KVTransferDone,
    PrefillChunkDone,
    PrefillDone,
    PrefillPaused,
    RequestArrived,
    RequestCancelled,
    RequestFailed,
    RequestFinished,
    TokensGenerated,
)
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.state import ClusterState
from controlplane.core.types import AdmissionVerdict, RequestSpec, RequestState, classify

_S = RequestState
_PREFILL_STATES = frozenset({_S.PREFILLING, _S.PAUSED})

Admission = Callable[[RequestSpec], AdmissionVerdict]


def apply_event(state: ClusterState, event: Event, admission: Admission) -> None:
    """Apply one event to `state`; `admission` judges arrivals against the current cluster."""
    match event:
        case RequestArrived():
            _arrived(state, event, admission)
        case InstanceUp():
            _instance_up(state, event)
        case InstanceDown():
            _instance_down(state, event)
        case _:
            req = state.requests.get(event.request_id)
            if req is None or req.state.is_terminal:
                state.stats["ignored_events"] += 1
                return
            _request_event(state, req, event)


def _request_event(state: ClusterState, req: RequestRecord, event: Event) -> None:
    match event:
        case PrefillChunkDone() if req.state in _PREFILL_STATES:
            req.chunks_done = min(req.chunks_total, max(req.chunks_done, event.chunk_index + 1))
            if state.preemptible(req) and req.chunks_done - req.resumed_at_chunk == (
                state.chunks_before_pause(req)
            ):
                state.dirty = True  # it may lend its group to a short again
        case PrefillPaused() if req.state in _PREFILL_STATES:
            req.chunks_done = min(req.chunks_total, max(req.chunks_done, event.chunks_done))
        case PrefillDone() if req.state in _PREFILL_STATES:
            state.finish_prefill(req, event.at_s)
        case KVTransferDone() if (
            req.state is _S.TRANSFERRING_KV
            and req.transfer_dst == event.dst_instance_id
            and not req.decode_ids
        ):
            state.transfer_done(req, event.ok)
        case TokensGenerated():
            req.output_tokens += event.num_tokens
            req.failures_in_row = 0  # progress: the refusal back-off starts over
            if req.first_token_s is None:
                req.first_token_s = event.at_s
        case RequestFinished() if req.state is not _S.QUEUED:
            state.finish(req, event.at_s)
        case RequestCancelled():
            state.cancel(req, lifecycle.CANCEL, event.reason, event.at_s)
        case RequestFailed() if event.retryable and req.state is not _S.QUEUED:
            released = state.requeue(req, event.error or "retryable failure")
            state.remember_refusal(req, released, event.at_s)
        case RequestFailed() if not event.retryable:
            state.cancel(req, lifecycle.FAIL, event.error or "failed", event.at_s)
        case _:
            state.stats["ignored_events"] += 1


def _arrived(state: ClusterState, event: RequestArrived, admission: Admission) -> None:
    spec = event.spec
    if spec.request_id in state.requests:
        raise CoreError(ErrorCode.DUPLICATE_REQUEST, f"request {spec.request_id!r} exists")
    request_class = classify(spec.prompt_tokens, state.config.short_threshold_tokens)
    req = RequestRecord(spec, request_class, state.next_seq)
    state.next_seq += 1
    state.requests[spec.request_id] = req
    state.counts[(request_class, _S.QUEUED)] += 1
    state.enqueue(req)
    if spec.deadline_s is not None:
        state.add_deadline(req)
    verdict = admission(spec)
    if not verdict.ok:
        state.to_reject.append((spec.request_id, verdict.reason))


def _instance_up(state: ClusterState, event: InstanceUp) -> None:
    spec = event.spec
    if spec.instance_id in state.instances:
        raise CoreError(ErrorCode.DUPLICATE_INSTANCE, f"instance {spec.instance_id!r} is up")
    role = state.role_plan(spec, state.census)
    inst = InstanceRecord(spec, role, state.rng.random())
    state.census.add(role, spec)
    state.instances[spec.instance_id] = inst
    state.ledger.add_instance(spec.instance_id, spec.kv_capacity_tokens)
    state.pool.add(inst)
    state.dirty = True


def _instance_down(state: ClusterState, event: InstanceDown) -> None:
    instance_id = event.instance_id
    inst = state.instances.get(instance_id)
    if inst is None:
        raise CoreError(ErrorCode.UNKNOWN_INSTANCE, f"instance {instance_id!r} is not up")
    affected = set(state.ledger.requests_on(instance_id)) | inst.decoding | inst.paused
    if inst.prefill_id is not None:
        affected.add(inst.prefill_id)
    holder = state.requests.get(inst.held_for) if inst.held_for is not None else None
    if holder is not None:  # a queued long holding it must gather afresh, without this id
        holder.held_ids = tuple(i for i in holder.held_ids if i != instance_id)
    state.pool.remove(inst)
    state.ledger.remove_instance(instance_id)
    state.census.remove(inst.role, inst.spec)
    del state.instances[instance_id]
    state.dirty = True
    reason = f"{event.reason}: {instance_id}"
    for request_id in sorted(affected, key=lambda r: state.requests[r].seq):
        req = state.requests[request_id]
        if req.state.is_terminal:
            continue
        in_flight_to_dead_dst = (
            req.state is _S.TRANSFERRING_KV
            and req.transfer_dst == instance_id
            and not req.decode_ids
        )
        if in_flight_to_dead_dst:
            req.transfer_dst = None
            state.wait_for_transfer(request_id, front=True)
        else:
            state.requeue(req, reason)
