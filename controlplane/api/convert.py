"""Wire <-> domain conversion: every `x_to_proto` / `x_from_proto` of the control plane.

Protobuf messages exist only in controlplane/api; the runtime and the store see core and
store values. `*_from_proto` functions validate and raise `ApiError` naming the bad field.
"""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.core.types import (
    ClusterView,
    InstanceRole,
    InstanceSpec,
    InstanceView,
    RequestClass,
    RequestState,
    RequestView,
    SpKind,
)
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
    RequestFilter,
    SamplingParams,
)
from controlplane.telemetry import TraceContext
from protos.pecsched.v1 import cluster_pb2, common_pb2, inference_pb2

_INVALID = ApiErrorCode.INVALID_ARGUMENT

_STATE_TO_PROTO = {
    RequestState.QUEUED: common_pb2.REQUEST_STATE_QUEUED,
    RequestState.PREFILLING: common_pb2.REQUEST_STATE_PREFILLING,
    RequestState.PAUSED: common_pb2.REQUEST_STATE_PAUSED,
    RequestState.TRANSFERRING_KV: common_pb2.REQUEST_STATE_TRANSFERRING_KV,
    RequestState.DECODING: common_pb2.REQUEST_STATE_DECODING,
    RequestState.FINISHED: common_pb2.REQUEST_STATE_FINISHED,
    RequestState.CANCELLED: common_pb2.REQUEST_STATE_CANCELLED,
    RequestState.FAILED: common_pb2.REQUEST_STATE_FAILED,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}
_CLASS_TO_PROTO = {
    RequestClass.SHORT: common_pb2.REQUEST_CLASS_SHORT,
    RequestClass.LONG: common_pb2.REQUEST_CLASS_LONG,
}
_CLASS_FROM_PROTO = {v: k for k, v in _CLASS_TO_PROTO.items()}
_ROLE_TO_PROTO = {
    InstanceRole.GENERAL: common_pb2.INSTANCE_ROLE_GENERAL,
    InstanceRole.SHORT_DECODE: common_pb2.INSTANCE_ROLE_SHORT_DECODE,
    InstanceRole.LONG_RESERVED: common_pb2.INSTANCE_ROLE_LONG_RESERVED,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}
_SP_TO_PROTO = {SpKind.ULYSSES: common_pb2.SP_KIND_ULYSSES, SpKind.RING: common_pb2.SP_KIND_RING}
_TRANSFER_FROM_PROTO = {
    common_pb2.TRANSFER_STATE_PENDING: TransferState.PENDING,
    common_pb2.TRANSFER_STATE_TRANSFERRING: TransferState.TRANSFERRING,
    common_pb2.TRANSFER_STATE_DONE: TransferState.DONE,
    common_pb2.TRANSFER_STATE_FAILED: TransferState.FAILED,
}

MAX_ID_CHARS = 256


# ---- scalars ---------------------------------------------------------------------------------


def request_state_to_proto(state: RequestState) -> common_pb2.RequestState.ValueType:
    """RequestState -> enum value."""
    return _STATE_TO_PROTO[state]


def request_state_from_proto(value: int, field: str) -> RequestState:
    """Enum value -> RequestState (INVALID_ARGUMENT naming `field` when unknown)."""
    state: RequestState | None = _STATE_FROM_PROTO.get(value)  # type: ignore[call-overload]
    if state is None:
        raise ApiError(_INVALID, f"{field}: unknown request state {value}", field=field)
    return state


def request_class_to_proto(request_class: RequestClass) -> common_pb2.RequestClass.ValueType:
    """RequestClass -> enum value."""
    return _CLASS_TO_PROTO[request_class]


def request_class_from_proto(value: int, field: str) -> RequestClass | None:
    """Enum value -> RequestClass; UNSPECIFIED is None (any)."""
    if value == common_pb2.REQUEST_CLASS_UNSPECIFIED:
        return None
    request_class: RequestClass | None = _CLASS_FROM_PROTO.get(value)  # type: ignore[call-overload]
    if request_class is None:
        raise ApiError(_INVALID, f"{field}: unknown request class {value}", field=field)
    return request_class


def seconds_to_timestamp(seconds: float) -> Timestamp:
    """Epoch seconds -> Timestamp."""
    stamp = Timestamp()
    whole = math.floor(seconds)
    stamp.seconds = int(whole)
    stamp.nanos = min(999_999_999, int(round((seconds - whole) * 1e9)))
    return stamp


def timestamp_to_seconds(stamp: Timestamp) -> float:
    """Timestamp -> epoch seconds."""
    return float(stamp.seconds) + stamp.nanos / 1e9


def sampling_from_proto(sampling: common_pb2.SamplingParams) -> SamplingParams:
    """Validated sampling parameters (INVALID_ARGUMENT naming `sampling.<field>`)."""
    temperature, top_p = float(sampling.temperature), float(sampling.top_p)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ApiError(
            ApiErrorCode.BAD_SAMPLING,
            f"sampling.temperature: must be a finite number >= 0, got {temperature}",
            field="sampling.temperature",
        )
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise ApiError(
            ApiErrorCode.BAD_SAMPLING,
            f"sampling.top_p: must be in [0, 1] (0 = off), got {top_p}",
            field="sampling.top_p",
        )
    stop = sampling.stop_at_eos if sampling.HasField("stop_at_eos") else True
    return SamplingParams(temperature, top_p, sampling.seed, stop)


def sampling_to_proto(sampling: SamplingParams) -> common_pb2.SamplingParams:
    """SamplingParams -> message."""
    return common_pb2.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop_at_eos=sampling.stop_at_eos,
    )


# ---- client API ------------------------------------------------------------------------------


def request_to_proto(view: RequestView) -> inference_pb2.Request:
    """RequestView -> pecsched.v1.Request."""
    spec = view.spec
    message = inference_pb2.Request(
        request_id=spec.request_id,
        tenant=spec.tenant,
        request_class=request_class_to_proto(view.request_class),
        state=request_state_to_proto(view.state),
        prompt_tokens=spec.prompt_tokens,
        max_new_tokens=spec.max_new_tokens,
        output_tokens=view.output_tokens,
        priority=spec.priority,
        preemptions=view.num_preemptions,
        instance_ids=list(view.instance_ids),
        chunks_done=view.chunks_done,
        chunks_total=view.chunks_total,
        error=view.error,
    )
    times = message.timestamps
    times.arrival.CopyFrom(seconds_to_timestamp(spec.arrival_s))
    for name in ("first_scheduled", "prefill_done", "first_token", "finished"):
        value = getattr(view, f"{name}_s")
        if value is not None:
            getattr(times, name).CopyFrom(seconds_to_timestamp(value))
    if spec.deadline_s is not None:
        message.deadline.CopyFrom(seconds_to_timestamp(spec.deadline_s))
    return message


def list_filter_from_proto(request: inference_pb2.ListRequest) -> RequestFilter:
    """ListRequest filters -> RequestFilter."""
    states = frozenset(request_state_from_proto(s, "states") for s in request.states)
    return RequestFilter(
        states=states,
        request_class=request_class_from_proto(request.request_class, "request_class"),
        tenant=request.tenant or None,
    )


def token_chunk_to_proto(
    request_id: str,
    start_index: int,
    token_ids: list[int] | tuple[int, ...],
    text: str,
    final_state: RequestState | None = None,
    error: str = "",
) -> inference_pb2.TokenChunk:
    """One TokenChunk (final_state only on the last chunk)."""
    chunk = inference_pb2.TokenChunk(
        request_id=request_id, start_index=start_index, token_ids=list(token_ids), text=text
    )
    if final_state is not None:
        chunk.final_state = request_state_to_proto(final_state)
        chunk.error = error
    return chunk


def instance_to_proto(view: InstanceView) -> common_pb2.Instance:
    """InstanceView -> Instance (state UP: views list only instances that are up)."""
    spec = view.spec
    return common_pb2.Instance(
        instance_id=spec.instance_id,
        node_id=spec.node_id,
        role=_ROLE_TO_PROTO[view.role],
        state=common_pb2.INSTANCE_STATE_UP,
        tp=spec.tp,
        kv_capacity_tokens=spec.kv_capacity_tokens,
        kv_used_tokens=view.kv_used_tokens,
        request_ids=list(view.request_ids),
    )


def cluster_to_proto(view: ClusterView, throughput_rps: float) -> inference_pb2.ClusterSnapshot:
    """ClusterView -> ClusterSnapshot."""
    return inference_pb2.ClusterSnapshot(
        at=seconds_to_timestamp(view.at_s),
        policy=view.policy,
        classes=[
            inference_pb2.ClassStats(
                request_class=request_class_to_proto(c.request_class),
                queued=c.queued,
                prefilling=c.prefilling,
                paused=c.paused,
                transferring_kv=c.transferring_kv,
                decoding=c.decoding,
                finished_total=c.finished_total,
                queued_tokens=c.queued_tokens,
            )
            for c in view.classes
        ],
        instances=[instance_to_proto(i) for i in view.instances],
        preemptions_total=view.preemptions_total,
        colocations_total=view.colocations_total,
        kv_transfers_total=view.kv_transfers_total,
        throughput_rps=throughput_rps,
    )


# ---- agent API -------------------------------------------------------------------------------


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
        role = _ROLE_FROM_PROTO.get(spec.role, InstanceRole.GENERAL)
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


def trace_to_proto(trace: TraceContext | None) -> common_pb2.TraceContext | None:
    """TraceContext -> message (None stays None)."""
    if trace is None:
        return None
    return common_pb2.TraceContext(traceparent=trace.traceparent, tracestate=trace.tracestate)


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
