"""Turning the policy's actions into agent commands and timeline entries (tick thread).

Addressing: an action goes to every node hosting one of its instances (an SP group spanning
nodes gets one command per node, each naming the whole group and the same rendezvous store,
`rendezvous_for`). TransferKV goes to the source and the destination node, meeting at the
source node's store. Reject needs no command: the request fails without running.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.core.actions import (
    Action,
    Cancel,
    Colocate,
    Pause,
    Reject,
    Resume,
    StartDecode,
    StartPrefill,
    TransferKV,
)
from controlplane.core.types import RequestView, SpKind
from controlplane.runtime.commands import (
    AgentCommand,
    CancelOrder,
    ColocateOrder,
    DecodeOrder,
    Order,
    PauseOrder,
    PrefillOrder,
    ResumeOrder,
    TransferOrder,
)
from controlplane.runtime.state import RuntimeState, TransferInfo
from controlplane.store.records import DetailValue, RequestEvent, RequestEventKind
from controlplane.telemetry import TraceContext

_K = RequestEventKind


TRANSFER_GRACE_S = 1.0  # the runtime gives up at 1.5 x the agents' timeout + this


def commands_for(
    action: Action,
    state: RuntimeState,
    *,
    sp_kind: SpKind,
    transfer_timeout_s: float,
    now_s: float,
    trace: TraceContext | None,
) -> list[AgentCommand]:
    """The commands carrying out `action` (updates transfer and attempt bookkeeping)."""
    rid = action.request_id
    order: Order
    match action:
        case StartPrefill():
            order = _prefill(
                state,
                rid,
                action.instance_ids,
                action.sp_kind,
                action.chunk_tokens,
                action.decode_in_place,
            )
            nodes = action.instance_ids
        case Colocate():
            order, nodes = _colocate(action, state, sp_kind), (action.host_instance_id,)
        case Pause():
            order, nodes = PauseOrder(rid), action.instance_ids
        case Resume():
            order, nodes = ResumeOrder(rid), action.instance_ids
        case TransferKV():
            order = _transfer(action, state, transfer_timeout_s, now_s)
            nodes = (action.src_instance_id, action.dst_instance_id)
        case StartDecode():
            order, nodes = _decode(action, state), (action.instance_id,)
        case Cancel():
            order, nodes = CancelOrder(rid), action.instance_ids
        case Reject():
            return []
    node_ids = sorted({state.instance_node[i] for i in nodes if i in state.instance_node})
    return [AgentCommand(node_id, order, rid, trace) for node_id in node_ids]


def _colocate(action: Colocate, state: RuntimeState, sp_kind: SpKind) -> ColocateOrder:
    prefill = _prefill(
        state,
        action.request_id,
        (action.host_instance_id,),
        sp_kind,
        action.chunk_tokens,
        action.decode_in_place,
    )
    return ColocateOrder(prefill, action.iteration_prefill_budget_tokens, action.mixed_batch_tokens)


def _transfer(
    action: TransferKV, state: RuntimeState, transfer_timeout_s: float, now_s: float
) -> TransferOrder:
    """A new transfer id for the request's next attempt, tracked until it expires."""
    rid = action.request_id
    record = state.requests[rid]
    record.attempts += 1
    transfer_id = f"{rid}/{state.epoch}/t{record.attempts}"
    src, dst = action.src_instance_id, action.dst_instance_id
    expires_s = now_s + 1.5 * transfer_timeout_s + TRANSFER_GRACE_S
    state.transfers[transfer_id] = TransferInfo(rid, src, dst, expires_s)
    return TransferOrder(
        rid,
        transfer_id,
        src,
        dst,
        group_id=transfer_id,
        rendezvous_address=state.rendezvous.get(state.instance_node.get(src, ""), ""),
        timeout_s=transfer_timeout_s,
    )


def _decode(action: StartDecode, state: RuntimeState) -> DecodeOrder:
    record = state.requests[action.request_id]
    return DecodeOrder(
        action.request_id,
        action.instance_id,
        record.last_transfer,
        record.inputs.max_new_tokens,
        record.inputs.sampling,
        tuple(record.log.ids),
    )


def _prefill(
    state: RuntimeState,
    rid: str,
    instance_ids: tuple[str, ...],
    sp_kind: SpKind,
    chunk_tokens: int,
    decode_in_place: bool,
) -> PrefillOrder:
    record = state.requests[rid]
    inputs = record.inputs
    generated = tuple(record.log.ids)
    record.attempts += 1
    record.gen_base = len(generated)
    record.last_transfer = ""
    return PrefillOrder(
        request_id=rid,
        prompt_token_ids=inputs.prompt_token_ids,
        instance_ids=instance_ids,
        sp_kind=sp_kind,
        chunk_tokens=chunk_tokens,
        group_id=f"{rid}/{state.epoch}/p{record.attempts}",
        max_new_tokens=inputs.max_new_tokens,
        sampling=inputs.sampling,
        decode_in_place=decode_in_place,
        generated_token_ids=generated,
        rendezvous_address=rendezvous_for(instance_ids, state.instance_node, state.rendezvous),
    )


def rendezvous_for(
    instance_ids: tuple[str, ...], instance_node: Mapping[str, str], rendezvous: Mapping[str, str]
) -> str:
    """Where an SP group's members meet: the rendezvous store of the node of the first member
    (rank 0, which samples and reports) whose node registered one; "" when none did (a group
    on one node then meets at that node's own store; the agents refuse one spanning nodes)."""
    for instance_id in instance_ids:
        address = rendezvous.get(instance_node.get(instance_id, ""), "")
        if address:
            return address
    return ""


def timeline_for(action: Action, view: RequestView | None, at_s: float) -> RequestEvent | None:
    """The timeline entry of an action (None for Cancel/Reject: the final state records it)."""
    rid = action.request_id
    match action:
        case StartPrefill():
            details: dict[str, DetailValue] = {
                "sp_degree": action.sp_degree,
                "num_chunks": action.num_chunks,
                "first_chunk_index": action.first_chunk_index,
                "reason": action.reason,
            }
            return RequestEvent(rid, _K.PREFILL_STARTED, at_s, action.instance_ids[0], details)
        case Colocate():
            details = {
                "budget_tokens": action.iteration_prefill_budget_tokens,
                "reason": action.reason,
            }
            return RequestEvent(rid, _K.COLOCATED, at_s, action.host_instance_id, details)
        case Pause():
            chunks = view.chunks_done if view is not None else 0
            details = {"reason": action.reason, "chunks_done": chunks}
            return RequestEvent(rid, _K.PAUSED, at_s, action.instance_ids[0], details)
        case Resume():
            paused = view.paused_total_s if view is not None else 0.0
            details = {"reason": action.reason, "paused_s": paused}
            return RequestEvent(rid, _K.RESUMED, at_s, action.instance_ids[0], details)
        case TransferKV():
            details = {
                "src": action.src_instance_id,
                "dst": action.dst_instance_id,
            }
            return RequestEvent(rid, _K.KV_TRANSFER_STARTED, at_s, action.src_instance_id, details)
        case StartDecode():
            return RequestEvent(rid, _K.DECODE_STARTED, at_s, action.instance_id)
    return None


def action_instances(action: Action) -> list[str]:
    """Instance ids an action names, for span attributes."""
    match action:
        case StartPrefill() | Pause() | Resume() | Cancel():
            return list(action.instance_ids)
        case Colocate():
            return [action.host_instance_id]
        case TransferKV():
            return [action.src_instance_id, action.dst_instance_id]
        case StartDecode():
            return [action.instance_id]
    return []
