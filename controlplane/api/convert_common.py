"""Values both gRPC APIs carry: request states and classes, instance roles, timestamps,
sampling parameters and trace contexts.

Every conversion here is an `x_to_proto` / `x_from_proto` pair (or one half of it) and the only
place its mapping is written; the client API (`convert.py`) and the agent link
(`convert_cluster.py`) both build on it, and it imports neither. `*_from_proto` functions
validate and raise `ApiError` naming the bad field.
"""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.core.types import InstanceRole, RequestClass, RequestState
from controlplane.store.records import SamplingParams
from controlplane.telemetry import TraceContext
from protos.pecsched.v1 import common_pb2

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


def instance_role_to_proto(role: InstanceRole) -> common_pb2.InstanceRole.ValueType:
    """InstanceRole -> enum value."""
    return _ROLE_TO_PROTO[role]


def instance_role_from_proto(value: common_pb2.InstanceRole.ValueType) -> InstanceRole:
    """Enum value -> InstanceRole; UNSPECIFIED and unknown values are GENERAL."""
    return _ROLE_FROM_PROTO.get(value, InstanceRole.GENERAL)


def trace_to_proto(trace: TraceContext | None) -> common_pb2.TraceContext | None:
    """TraceContext -> message (None stays None)."""
    if trace is None:
        return None
    return common_pb2.TraceContext(traceparent=trace.traceparent, tracestate=trace.tracestate)
