"""Conversions between the SDK's types (`sdk/types.py`) and the wire messages; one place for both
clients. `*_to_proto` builds requests (validating client input, errors name the field);
`*_from_proto` reads replies. Enum values the SDK does not know (added later within v1) read as
UNSPECIFIED instead of failing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf import timestamp_pb2

from protos.pecsched.v1 import common_pb2, inference_pb2
from sdk.types import (
    ChatMessage,
    ClassStats,
    ClusterSnapshot,
    InstanceInfo,
    InstanceRole,
    InstanceState,
    ListPage,
    Prompt,
    RequestClass,
    RequestInfo,
    RequestState,
    RequestTimestamps,
    Sampling,
    SubmitResult,
    TokenChunk,
)

_E = TypeVar("_E", bound=enum.Enum)
_V = TypeVar("_V", bound=int)

_MAX_UINT32 = 2**32 - 1
_MAX_INT32 = 2**31 - 1


def _enum_from_proto(
    name_of: Callable[[_V], str], prefix: str, value: _V, sdk_enum: type[_E], unknown: _E
) -> _E:
    # Proto names are PREFIX + the SDK member name, e.g. REQUEST_STATE_QUEUED <-> QUEUED.
    try:
        name = name_of(value)
    except ValueError:
        return unknown
    member = sdk_enum.__members__.get(name.removeprefix(prefix))
    return member if member is not None else unknown


def state_from_proto(value: common_pb2.RequestState.ValueType) -> RequestState:
    """SDK request state of a `pecsched.v1.RequestState` value."""
    return _enum_from_proto(
        common_pb2.RequestState.Name,
        "REQUEST_STATE_",
        value,
        RequestState,
        RequestState.UNSPECIFIED,
    )


def state_to_proto(state: RequestState) -> common_pb2.RequestState.ValueType:
    """`pecsched.v1.RequestState` value of an SDK request state."""
    return common_pb2.RequestState.Value("REQUEST_STATE_" + state.name)


def class_from_proto(value: common_pb2.RequestClass.ValueType) -> RequestClass:
    """SDK request class of a `pecsched.v1.RequestClass` value."""
    return _enum_from_proto(
        common_pb2.RequestClass.Name,
        "REQUEST_CLASS_",
        value,
        RequestClass,
        RequestClass.UNSPECIFIED,
    )


def class_to_proto(request_class: RequestClass) -> common_pb2.RequestClass.ValueType:
    """`pecsched.v1.RequestClass` value of an SDK request class."""
    return common_pb2.RequestClass.Value("REQUEST_CLASS_" + request_class.name)


def datetime_from_proto(ts: timestamp_pb2.Timestamp, is_set: bool) -> datetime | None:
    """Aware UTC datetime of a Timestamp; None when the field is not set."""
    return ts.ToDatetime(tzinfo=UTC) if is_set else None


def datetime_to_proto(when: datetime, field: str) -> timestamp_pb2.Timestamp:
    """Timestamp of an aware datetime; a naive one is rejected, naming `field`."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{field} must be a timezone-aware datetime, got naive {when!r}")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(UTC))
    return ts


def _token_ids(ids: Iterable[object], field: str) -> list[int]:
    out: list[int] = []
    for i, token_id in enumerate(ids):
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise ValueError(f"{field}[{i}] must be an int, got {token_id!r}")
        if not 0 <= token_id <= _MAX_UINT32:
            raise ValueError(f"{field}[{i}] must be in [0, 2**32), got {token_id}")
        out.append(token_id)
    return out


def sampling_to_proto(sampling: Sampling) -> common_pb2.SamplingParams:
    """Wire sampling parameters of SDK ones."""
    params = common_pb2.SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed
    )
    if sampling.stop_at_eos is not None:
        params.stop_at_eos = sampling.stop_at_eos
    return params


def submit_to_proto(
    prompt: Prompt,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    priority: int,
    tenant: str,
    deadline: datetime | None,
    idempotency_key: str,
) -> inference_pb2.SubmitRequest:
    """The SubmitRequest for a text prompt (str), chat messages or token ids (ints)."""
    request = inference_pb2.SubmitRequest(
        sampling=sampling_to_proto(sampling), tenant=tenant, idempotency_key=idempotency_key
    )
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        request.text = prompt
    elif prompt and isinstance(prompt[0], ChatMessage):
        for i, m in enumerate(prompt):
            if not isinstance(m, ChatMessage):
                raise ValueError(f"prompt[{i}] must be a ChatMessage, got {m!r}")
            request.chat.messages.add(role=m.role, content=m.content)
    else:
        ids = _token_ids(prompt, "prompt")
        if not ids:
            raise ValueError("prompt must not be empty")
        request.token_ids.ids.extend(ids)
    if not 0 < max_new_tokens <= _MAX_UINT32:
        raise ValueError(f"max_new_tokens must be in [1, 2**32), got {max_new_tokens}")
    request.max_new_tokens = max_new_tokens
    if not -_MAX_INT32 - 1 <= priority <= _MAX_INT32:
        raise ValueError(f"priority must fit in int32, got {priority}")
    request.priority = priority
    if not idempotency_key:
        raise ValueError("idempotency_key must not be empty")
    if deadline is not None:
        request.deadline.CopyFrom(datetime_to_proto(deadline, "deadline"))
    return request


def submit_result_from_proto(
    response: inference_pb2.SubmitResponse, idempotency_key: str
) -> SubmitResult:
    """SDK result of a SubmitResponse (plus the key the client sent)."""
    return SubmitResult(
        request_id=response.request_id,
        request_class=class_from_proto(response.request_class),
        prompt_tokens=response.prompt_tokens,
        deduplicated=response.deduplicated,
        idempotency_key=idempotency_key,
    )


def request_info_from_proto(request: inference_pb2.Request) -> RequestInfo:
    """SDK view of a wire Request."""
    ts = request.timestamps
    return RequestInfo(
        request_id=request.request_id,
        tenant=request.tenant,
        request_class=class_from_proto(request.request_class),
        state=state_from_proto(request.state),
        prompt_tokens=request.prompt_tokens,
        max_new_tokens=request.max_new_tokens,
        output_tokens=request.output_tokens,
        priority=request.priority,
        timestamps=RequestTimestamps(
            arrival=datetime_from_proto(ts.arrival, ts.HasField("arrival")),
            first_scheduled=datetime_from_proto(ts.first_scheduled, ts.HasField("first_scheduled")),
            prefill_done=datetime_from_proto(ts.prefill_done, ts.HasField("prefill_done")),
            first_token=datetime_from_proto(ts.first_token, ts.HasField("first_token")),
            finished=datetime_from_proto(ts.finished, ts.HasField("finished")),
        ),
        preemptions=request.preemptions,
        instance_ids=tuple(request.instance_ids),
        chunks_done=request.chunks_done,
        chunks_total=request.chunks_total,
        error=request.error,
        deadline=datetime_from_proto(request.deadline, request.HasField("deadline")),
    )


def token_chunk_from_proto(chunk: inference_pb2.TokenChunk) -> TokenChunk:
    """SDK view of a wire TokenChunk (`final_state` None unless the stream's last chunk)."""
    final = state_from_proto(chunk.final_state)
    return TokenChunk(
        request_id=chunk.request_id,
        start_index=chunk.start_index,
        token_ids=tuple(chunk.token_ids),
        text=chunk.text,
        final_state=None if final is RequestState.UNSPECIFIED else final,
        error=chunk.error,
    )


def list_to_proto(
    *,
    states: Iterable[RequestState],
    request_class: RequestClass | None,
    tenant: str,
    page_size: int,
    page_token: str,
) -> inference_pb2.ListRequest:
    """The ListRequest for these filters (empty filters match any)."""
    if not 0 <= page_size <= 1000:
        raise ValueError(f"page_size must be in [0, 1000], got {page_size}")
    request = inference_pb2.ListRequest(tenant=tenant, page_size=page_size, page_token=page_token)
    request.states.extend(state_to_proto(state) for state in states)
    if request_class is not None:
        request.request_class = class_to_proto(request_class)
    return request


def list_page_from_proto(response: inference_pb2.ListResponse) -> ListPage:
    """SDK page of a ListResponse."""
    return ListPage(
        requests=tuple(request_info_from_proto(r) for r in response.requests),
        next_page_token=response.next_page_token,
    )


def _instance_from_proto(instance: common_pb2.Instance) -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance.instance_id,
        node_id=instance.node_id,
        role=_enum_from_proto(
            common_pb2.InstanceRole.Name,
            "INSTANCE_ROLE_",
            instance.role,
            InstanceRole,
            InstanceRole.UNSPECIFIED,
        ),
        state=_enum_from_proto(
            common_pb2.InstanceState.Name,
            "INSTANCE_STATE_",
            instance.state,
            InstanceState,
            InstanceState.UNSPECIFIED,
        ),
        tp=instance.tp,
        device_indices=tuple(instance.device_indices),
        kv_capacity_tokens=instance.kv_capacity_tokens,
        kv_used_tokens=instance.kv_used_tokens,
        request_ids=tuple(instance.request_ids),
    )


def snapshot_from_proto(snapshot: inference_pb2.ClusterSnapshot) -> ClusterSnapshot:
    """SDK view of a wire ClusterSnapshot."""
    return ClusterSnapshot(
        at=datetime_from_proto(snapshot.at, snapshot.HasField("at")),
        policy=snapshot.policy,
        classes=tuple(
            ClassStats(
                request_class=class_from_proto(c.request_class),
                num_queued=c.queued,
                num_prefilling=c.prefilling,
                num_paused=c.paused,
                num_transferring_kv=c.transferring_kv,
                num_decoding=c.decoding,
                num_finished_total=c.finished_total,
                num_queued_tokens=c.queued_tokens,
            )
            for c in snapshot.classes
        ),
        instances=tuple(_instance_from_proto(i) for i in snapshot.instances),
        num_preemptions_total=snapshot.preemptions_total,
        num_colocations_total=snapshot.colocations_total,
        num_kv_transfers_total=snapshot.kv_transfers_total,
        throughput_rps=snapshot.throughput_rps,
    )
