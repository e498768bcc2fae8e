"""Fuzzing a real control plane (SQLite and PostgreSQL) over loopback gRPC.

Hypothesis draws request messages of every Inference method and the agents' Attach stream
from their descriptors (over-long and NUL-carrying strings, boundary and non-finite numbers,
undefined enum values, nested messages), and raw random bytes for every method. Every answer
must be OK or a documented client-error status, and afterwards the server still serves and
never rebuilt its state. Bounded: 40 examples per strategy, derandomized so CI runs are
reproducible; `PECSCHED_FUZZ_EXAMPLES=N` runs N random (not derandomized) examples instead,
for a longer hunt.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import grpc
import pytest
from cp_harness import ControlPlane, make_config, start_control_plane, submit_request
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.pecsched.v1 import cluster_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(180)

EXAMPLES = int(os.environ.get("PECSCHED_FUZZ_EXAMPLES", "40"))
_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="PECSCHED_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# The client-error statuses of the error catalog (controlplane/api/errors.py), plus the
# client's own deadline/cancel of a stream that is still open.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
}
STREAM_CLIENT_CODES = CLIENT_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}

_INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
_INTS = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "a\x00b", "req-" + "f" * 32, "x" * 65, "y" * 129, "z" * 5000]),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-1, 12)
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    low, high = _INTS[field.type]
    edges = st.sampled_from([low, high, 0, 1, 2**31 - 1, 2**31, 2**63 - 1])
    return st.one_of(edges.filter(lambda v: low <= v <= high), st.integers(low, high))


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type with a random subset of fields set."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            one = messages(field.message_type, depth + 1)
        else:
            one = _scalar(field)
        parts[field.name] = st.lists(one, max_size=3) if field.is_repeated else one
    cls = message_factory.GetMessageClass(descriptor)
    fields = st.fixed_dictionaries({}, optional=parts)
    return fields.map(lambda values: _build(cls, values))


def _build(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for name, value in values.items():
        if isinstance(value, list):
            items = getattr(message, name)
            for item in value:
                if isinstance(item, Message):
                    items.add().CopyFrom(item)
                else:
                    items.append(item)
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


class ServerThread:
    """A control plane on its own event loop in a thread, for synchronous fuzzing clients."""

    def __init__(self, db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = make_config(db_url, max_new_tokens_limit=64)
        self.cp: ControlPlane = self._run(start_control_plane(config))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self._run(self.cp.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server(db_url: str) -> Any:
    """A running control plane and a channel to it."""
    thread = ServerThread(db_url)
    channel = grpc.insecure_channel(thread.cp.target)
    yield thread, channel
    channel.close()
    thread.stop()


def _code(call: Any) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):
            next(result, None)
            result.cancel()
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code
    return grpc.StatusCode.OK


def _call_inference(channel: grpc.Channel, method: str, request: Any) -> grpc.StatusCode:
    stub = inference_pb2_grpc.InferenceStub(channel)
    return _code(lambda: getattr(stub, method)(request, timeout=2))


def _call_attach(channel: grpc.Channel, sent: list[Any]) -> grpc.StatusCode:
    attach = channel.stream_stream(
        "/pecsched.v1.Cluster/Attach",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=cluster_pb2.ControlMessage.FromString,
    )

    def drain() -> Any:
        for _ in attach(iter(sent), timeout=2):
            pass

    return _code(drain)


def _assert_still_serving(thread: ServerThread, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    reply = inference_pb2_grpc.InferenceStub(channel).Submit(submit_request([1, 2], 2), timeout=5)
    assert status == health_pb2.HealthCheckResponse.SERVING and reply.request_id
    assert thread.cp.runtime.serving
    assert sum(thread.cp.runtime.metrics.rebuilds.values.values()) == 0


_INFERENCE_REQUESTS = st.one_of(
    *(
        st.tuples(st.just(m.name), messages(m.input_type))
        for m in _INFERENCE.methods
        if m.name != "Watch"
    ),
    st.tuples(st.just("Watch"), messages(inference_pb2.WatchRequest.DESCRIPTOR)),
)


def test_fuzzed_messages_get_client_statuses_only(server):
    thread, channel = server
    codes: list[tuple[str, grpc.StatusCode]] = []

    @_SETTINGS
    @given(_INFERENCE_REQUESTS, st.lists(messages(cluster_pb2.AgentMessage.DESCRIPTOR), max_size=3))
    def run(inference: tuple[str, Any], agent_messages: list[Any]) -> None:
        method, request = inference
        code = _call_inference(channel, method, request)
        allowed = STREAM_CLIENT_CODES if method in ("Generate", "Watch") else CLIENT_CODES
        assert code in allowed, (method, request, code)
        code = _call_attach(channel, agent_messages)
        assert code in STREAM_CLIENT_CODES, (agent_messages, code)
        codes.append((method, code))

    # Execute
    run()
    # Assert
    assert len(codes) == EXAMPLES
    _assert_still_serving(thread, channel)


_METHODS = [
    *(f"/pecsched.v1.Inference/{m.name}" for m in _INFERENCE.methods),
    "/pecsched.v1.Cluster/Attach",
]


def test_raw_random_bytes_get_client_statuses_only(server):
    thread, channel = server
    identity = {"request_serializer": None, "response_deserializer": None}
    seen: list[grpc.StatusCode] = []

    @_SETTINGS
    @given(st.sampled_from(_METHODS), st.binary(max_size=200))
    def run(method: str, data: bytes) -> None:
        if method.endswith("Attach"):
            call = channel.stream_stream(method, **identity)

            def send() -> Any:
                for _ in call(iter([data]), timeout=2):
                    pass

            code = _code(send)
        elif method.endswith(("Generate", "Watch")):
            stream = channel.unary_stream(method, **identity)
            code = _code(lambda: stream(data, timeout=2))
        else:
            unary = channel.unary_unary(method, **identity)
            code = _code(lambda: unary(data, timeout=2))
        assert code in STREAM_CLIENT_CODES, (method, data, code)
        seen.append(code)

    # Execute
    run()
    # Assert
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    _assert_still_serving(thread, channel)
