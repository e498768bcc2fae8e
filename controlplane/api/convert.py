"""Wire <-> domain conversion of the control plane: the client API's messages (pecsched.v1
inference.proto) convert here, and every conversion is importable from here, so callers
import only `convert`.

Protobuf messages exist only in controlplane/api; the runtime and the store see core and
store values. Each conversion is written once: values shared by both APIs in
`convert_common.py`, the agent link in `convert_cluster.py`, client messages here.
`*_from_proto` functions validate and raise `ApiError` naming the bad field.
"""

from __future__ import annotations

from controlplane.api.convert_cluster import (
    command_to_proto,
    registered_to_proto,
    registration_from_proto,
    report_from_proto,
)
from controlplane.api.convert_common import (
    instance_role_from_proto,
    instance_role_to_proto,
    request_class_from_proto,
    request_class_to_proto,
    request_state_from_proto,
    request_state_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    seconds_to_timestamp,
    timestamp_to_seconds,
    trace_to_proto,
)
from controlplane.core.types import ClusterView, InstanceView, RequestState, RequestView
from controlplane.store.records import RequestFilter
from protos.pecsched.v1 import common_pb2, inference_pb2

__all__ = [
    "cluster_to_proto",
    "command_to_proto",
    "instance_role_from_proto",
    "instance_role_to_proto",
    "instance_to_proto",
    "list_filter_from_proto",
    "registered_to_proto",
    "registration_from_proto",
    "report_from_proto",
    "request_class_from_proto",
    "request_class_to_proto",
    "request_state_from_proto",
    "request_state_to_proto",
    "request_to_proto",
    "sampling_from_proto",
    "sampling_to_proto",
    "seconds_to_timestamp",
    "timestamp_to_seconds",
    "token_chunk_to_proto",
    "trace_to_proto",
]


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
        role=instance_role_to_proto(view.role),
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
