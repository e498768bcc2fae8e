"""The agent link (pecsched.v1 cluster.proto): registrations, event reports and commands.

Agent messages become runtime values (`Registration`, `NodeJoin`, `AgentReport`) and runtime
`AgentCommand`s become `ControlMessage`s; nothing else in the control plane sees these
messages. Malformed agent input raises `ApiError` with PROTOCOL_VIOLATION naming the field.
Shared values (enums, sampling, trace contexts) convert through `convert_common.py`.
"""

from __future__ import annotations

from controlplane.api.convert_common import (
    instance_role_from_proto,
    sampling_to_proto,
    trace_to_proto,
)
from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.core.types import InstanceSpec, SpKind
from controlplane.runtime.agents import Registration
from controlplane.runtime.commands import (
    AgentCommand,
    CancelOrder,
    ColocateOrder,
    DecodeOrder,
    PauseOrder,
    PrefillOrder,
    ResumeOrder,
    ShutdownOrder,
    TransferOrder,
)
from controlplane.runtime.inputs import NodeJoin
from controlplane.runtime.reports import (
    AgentReport,
    Cancelled,
    Failed,
    Finished,
    KvTransferUpdate,
    Paused,
    PrefillChunkDone,
    PrefillDone,
    ReportBody,
    Tokens,
    TransferState,
)
from controlplane.store.records import (
    InstanceState,
    NodeRecord,
    NodeState,
    RegisteredInstance,
)
from protos.pecsched.v1 import cluster_pb2, common_pb2

_SP_TO_PROTO = {SpKind.ULYSSES: common_pb2.SP_KIND_ULYSSES, SpKind.RING: common_pb2.SP_KIND_RING}
_TRANSFER_FROM_PROTO = {
    common_pb2.TRANSFER_STATE_PENDING: TransferState.PENDING,
    common_pb2.TRANSFER_STATE_TRANSFERRING: TransferState.TRANSFERRING,
    common_pb2.TRANSFER_STATE_DONE: TransferState.DONE,
    common_pb2.TRANSFER_STATE_FAILED: TransferState.FAILED,
}

MAX_ID_CHARS = 256


def _check_id(value: str, field: str) -> str:
    if not value or len(value) > MAX_ID_CHARS or "," in value:
        raise ApiError(
            ApiErrorCode.PROTOCOL_VIOLATION,
            f"{field}: must be 1..{MAX_ID_CHARS} characters without commas, got {value!r}",
            field=field,
        )
    return value


def registration_from_proto(
    register: cluster_pb2.Register, peer: str, now_s: float
) -> tuple[Registration, NodeJoin]:
    """Register -> (Registration, NodeJoin), validated (PROTOCOL_VIOLATION naming the field)."""
    node_id = _check_id(register.node_id, "register.node_id")
    if not register.instances:
        raise ApiError(
            ApiErrorCode.PROTOCOL_VIOLATION,
            "register.instances: an agent must register at least one instance",
            field="register.instances",
        )
    records: list[RegisteredInstance] = []
    for i, spec in enumerate(register.instances):
        field = f"register.instances[{i}]"
        role = instance_role_from_proto(spec.role)
        tp = spec.tp or max(1, len(spec.device_indices))
        devices = tuple(spec.device_indices) or tuple(range(tp))
        try:
            core_spec = InstanceSpec(
                _check_id(spec.instance_id, f"{field}.instance_id"),
                node_id,
                role,
                tp,
                spec.kv_capacity_tokens,
            )
            records.append(RegisteredInstance(core_spec, InstanceState.UP, devices, now_s))
        except ValueError as exc:
            raise ApiError(ApiErrorCode.PROTOCOL_VIOLATION, f"{field}: {exc}", field=field) from exc
    ids = tuple(r.spec.instance_id for r in records)
    if len(set(ids)) != len(ids):
        raise ApiError(
            ApiErrorCode.PROTOCOL_VIOLATION,
            f"register.instances: duplicate instance ids {sorted(ids)}",
            field="register.instances",
        )
    registration = Registration(
        node_id,
        register.model,
        ids,
        register.rendezvous_address,
        tuple(register.resident_request_ids),
        register.vocab_size or None,
    )
    node = NodeRecord(node_id, peer, NodeState.UP, now_s, now_s)
    return registration, NodeJoin(node, tuple(records), register.rendezvous_address)


def registered_to_proto(
    seq: int, heartbeat_interval_s: float, drop_request_ids: tuple[str, ...]
) -> cluster_pb2.ControlMessage:
    """The Registered reply."""
    return cluster_pb2.ControlMessage(
        seq=seq,
        registered=cluster_pb2.Registered(
            heartbeat_interval_s=heartbeat_interval_s, drop_request_ids=list(drop_request_ids)
        ),
    )


def report_from_proto(event: cluster_pb2.Event, node_id: str, received_s: float) -> AgentReport:
    """Event -> AgentReport (PROTOCOL_VIOLATION for an event without a kind)."""
    kind = event.WhichOneof("kind")
    body: ReportBody
    if kind == "chunk_done":
        c = event.chunk_done
        body = PrefillChunkDone(
            c.chunk_index,
            c.chunks_total,
            c.duration_s,
            c.iteration,
            c.iteration_tokens,
            c.chunk_tokens,
        )
    elif kind == "prefill_done":
        body = PrefillDone(event.prefill_done.first_token_id)
    elif kind == "paused":
        body = Paused(event.paused.chunks_done)
    elif kind == "kv_transfer":
        t = event.kv_transfer
        state = _TRANSFER_FROM_PROTO.get(t.state, TransferState.PENDING)
        body = KvTransferUpdate(
            t.transfer_id, state, t.destination_instance_id, t.bytes, t.duration_s, t.error
        )
    elif kind == "tokens":
        body = Tokens(event.tokens.start_index, tuple(event.tokens.token_ids))
    elif kind == "finished":
        body = Finished(event.finished.output_tokens, event.finished.reason)
    elif kind == "failed":
        body = Failed(event.failed.error, event.failed.retryable)
    elif kind == "cancelled":
        body = Cancelled()
    else:
        raise ApiError(
            ApiErrorCode.PROTOCOL_VIOLATION, "event.kind: an Event must set one kind", field="kind"
        )
    return AgentReport(node_id, event.request_id, event.instance_id, body, received_s)


def _prefill_to_proto(order: PrefillOrder) -> cluster_pb2.StartPrefill:
    return cluster_pb2.StartPrefill(
        request_id=order.request_id,
        prompt_token_ids=order.prompt_token_ids,
        instance_ids=list(order.instance_ids),
        sp_kind=_SP_TO_PROTO[order.sp_kind],
        chunk_tokens=order.chunk_tokens,
        group_id=order.group_id,
        max_new_tokens=order.max_new_tokens,
        sampling=sampling_to_proto(order.sampling),
        decode_in_place=order.decode_in_place,
        generated_token_ids=order.generated_token_ids,
        rendezvous_address=order.rendezvous_address,
    )


def command_to_proto(command: AgentCommand, seq: int) -> cluster_pb2.ControlMessage:
    """AgentCommand -> ControlMessage carrying a Command."""
    message = cluster_pb2.Command(trace=trace_to_proto(command.trace))
    order = command.order
    match order:
        case PrefillOrder():
            message.start_prefill.CopyFrom(_prefill_to_proto(order))
        case ColocateOrder():
            message.colocate.CopyFrom(
                cluster_pb2.Colocate(
                    prefill=_prefill_to_proto(order.prefill),
                    iteration_prefill_budget_tokens=order.iteration_prefill_budget_tokens,
                    mixed_batch_tokens=order.mixed_batch_tokens,
                )
            )
        case PauseOrder():
            message.pause.request_id = order.request_id
        case ResumeOrder():
            message.resume.request_id = order.request_id
        case TransferOrder():
            message.transfer_kv.CopyFrom(
                cluster_pb2.TransferKv(
                    request_id=order.request_id,
                    transfer_id=order.transfer_id,
                    source_instance_id=order.source_instance_id,
                    destination_instance_id=order.destination_instance_id,
                    group_id=order.group_id,
                    rendezvous_address=order.rendezvous_address,
                    timeout_s=order.timeout_s,
                )
            )
        case DecodeOrder():
            message.start_decode.CopyFrom(
                cluster_pb2.StartDecode(
                    request_id=order.request_id,
                    transfer_id=order.transfer_id,
                    max_new_tokens=order.max_new_tokens,
                    sampling=sampling_to_proto(order.sampling),
                    generated_token_ids=order.generated_token_ids,
                    instance_id=order.instance_id,
                )
            )
        case CancelOrder():
            message.cancel.request_id = order.request_id
        case ShutdownOrder():
            message.shutdown.drain = order.drain
    return cluster_pb2.ControlMessage(seq=seq, command=message)
