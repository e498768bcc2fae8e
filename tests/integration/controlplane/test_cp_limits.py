"""Every string, number and enum field a caller sends, against its limit, on a real server.

For each leaf field of every request message (Inference methods and the agents' Attach
stream), on SQLite and PostgreSQL: a value just past its limit (or with a NUL, or not finite,
or an undefined enum value) is refused with INVALID_ARGUMENT naming the field; a value at the
limit never gets a server-side error (the database takes what the limits let through); and
the control plane keeps serving throughout.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cp_harness import make_config, start_control_plane, submit_request
from google.protobuf.descriptor import FieldDescriptor

from controlplane.api import limits
from controlplane.api.errors import ERROR_DETAIL_KEY
from protos.pecsched.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)

pytestmark = pytest.mark.timeout(120)

_SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
_INTS = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Leaf:
    """A field reachable from a request message, with the chain of fields leading to it."""

    method: str  # Inference method name, or "Attach"
    chain: tuple[FieldDescriptor, ...]

    @property
    def field(self) -> FieldDescriptor:
        return self.chain[-1]

    @property
    def path(self) -> str:
        return ".".join(f.name + ("[0]" if f.is_repeated else "") for f in self.chain)


def _leaves(method: str, descriptor: Any, chain: tuple = ()) -> list[Leaf]:
    found = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            found.extend(_leaves(method, field.message_type, (*chain, field)))
        elif field.type != FieldDescriptor.TYPE_BOOL:
            found.append(Leaf(method, (*chain, field)))
    return found


def all_leaves() -> list[Leaf]:
    """Leaves of every request message (each method's input), limits of ByConfig excluded."""
    services = (
        inference_pb2.DESCRIPTOR.services_by_name["Inference"],
        cluster_pb2.DESCRIPTOR.services_by_name["Cluster"],
    )
    leaves = [
        leaf
        for service in services
        for method in service.methods
        for leaf in _leaves(method.name, method.input_type)
    ]
    return [
        leaf
        for leaf in leaves
        if not isinstance(limits.LIMITS.get(leaf.field.full_name), limits.ByConfig)
    ]


def _each(field: FieldDescriptor) -> limits.Limit | None:
    limit = limits.LIMITS.get(field.full_name)
    return limit.each if isinstance(limit, limits.Items) else limit


def bad_values(field: FieldDescriptor) -> list[Any]:
    """Values just outside the field's limit that its wire type can carry."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        return [max(v.number for v in field.enum_type.values) + 1]
    limit = _each(field)
    if isinstance(limit, limits.Text):
        return ["x" * (limit.max_chars + 1), "a\x00b"]
    if not isinstance(limit, limits.Number):
        return []
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        wire_max = _FLOAT32_MAX if field.type == FieldDescriptor.TYPE_FLOAT else math.inf
        out = [math.inf, math.nan]
        if limit.high * 2 + 1 < wire_max:
            out.append(limit.high * 2 + 1)
        if limit.low > -wire_max:
            out.append(limit.low - 1)
        return out
    low, high = _INTS[field.type]
    return [v for v in (int(limit.low) - 1, int(limit.high) + 1) if low <= v <= high]


def edge_values(field: FieldDescriptor) -> list[Any]:
    """Values at the field's limit (they must never cause a server-side error)."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        return [max(v.number for v in field.enum_type.values)]
    limit = _each(field)
    if isinstance(limit, limits.Text):
        return ["\u00e9" * limit.max_chars]  # characters, not bytes, count
    if isinstance(limit, limits.Number):
        return [type(limit.high)(limit.high)]
    return []


def _set(message: Any, chain: tuple[FieldDescriptor, ...], value: Any) -> None:
    for field in chain[:-1]:
        if field.is_repeated:
            items = getattr(message, field.name)
            message = items[0] if len(items) else items.add()
        else:
            message = getattr(message, field.name)
    leaf = chain[-1]
    if leaf.is_repeated:
        getattr(message, leaf.name).append(value)
    else:
        setattr(message, leaf.name, value)


def _register(node_id: str) -> cluster_pb2.Register:
    spec = cluster_pb2.InstanceSpec(
        instance_id=f"{node_id}-i0", role=common_pb2.INSTANCE_ROLE_GENERAL, kv_capacity_tokens=1000
    )
    return cluster_pb2.Register(node_id=node_id, model="m", instances=[spec])


class Caller:
    """Sends one request with a leaf set; returns (status, ErrorDetail.field)."""

    def __init__(self, channel: grpc.aio.Channel, request_id: str) -> None:
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.cluster = cluster_pb2_grpc.ClusterStub(channel)
        self.request_id = request_id

    async def call(self, leaf: Leaf, value: Any) -> tuple[grpc.StatusCode, str]:
        try:
            if leaf.method == "Attach":
                await self._attach(leaf, value)
            else:
                await self._inference(leaf, value)
        except grpc.aio.AioRpcError as exc:
            detail = common_pb2.ErrorDetail()
            for key, raw in exc.trailing_metadata() or ():
                if key == ERROR_DETAIL_KEY:
                    detail = common_pb2.ErrorDetail.FromString(raw)
            return exc.code(), detail.field
        return grpc.StatusCode.OK, ""

    async def _inference(self, leaf: Leaf, value: Any) -> None:
        method = getattr(self.inference, leaf.method)
        request = _INPUTS[leaf.method](self.request_id)
        _set(request, leaf.chain, value)
        call = method(request, timeout=10)
        if leaf.method in ("Generate", "Watch"):
            await call.read()
            call.cancel()
        else:
            await call

    async def _attach(self, leaf: Leaf, value: Any) -> None:
        node_id = f"n-{uuid.uuid4().hex[:12]}"
        first = cluster_pb2.AgentMessage(seq=1, register=_register(node_id))
        messages = [first]
        if leaf.chain[0].name == "register" or leaf.chain[0].name == "seq":
            _set(first, leaf.chain, value)
        else:
            second = cluster_pb2.AgentMessage(seq=2)
            _set(second, leaf.chain, value)
            messages.append(second)
        call = self.cluster.Attach(timeout=10)
        for message in messages:
            await call.write(message)
        await call.done_writing()  # the server ends the stream: OK, or the refusal's status
        while await call.read() is not grpc.aio.EOF:  # raises the refusal
            pass


_INPUTS = {
    "Submit": lambda rid: submit_request([1, 2, 3], 2),
    "Generate": lambda rid: inference_pb2.GenerateRequest(request_id=rid),
    "Get": lambda rid: inference_pb2.GetRequest(request_id=rid),
    "Cancel": lambda rid: inference_pb2.CancelRequest(request_id=rid),
    "List": lambda rid: inference_pb2.ListRequest(),
    "Watch": lambda rid: inference_pb2.WatchRequest(interval_s=0.1),
}


async def test_every_field_past_its_limit_is_refused_naming_it_and_at_its_limit_is_stored(db_url):
    # Prepare: no agents; one request to address
    cp = await start_control_plane(make_config(db_url, max_new_tokens_limit=2**31 - 1))
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    rid = (await stub.Submit(submit_request([1, 2, 3], 2))).request_id
    caller = Caller(channel, rid)
    leaves = all_leaves()
    refused_wrongly: list[tuple[str, Any, Any]] = []
    failed_at_edge: list[tuple[str, Any]] = []
    num_bad = 0
    try:
        # Execute
        for leaf in leaves:
            for value in bad_values(leaf.field):
                num_bad += 1
                code, field = await caller.call(leaf, value)
                if (code, field) != (grpc.StatusCode.INVALID_ARGUMENT, leaf.path):
                    refused_wrongly.append((leaf.path, repr(value)[:20], (code, field)))
            for value in edge_values(leaf.field):
                code, _ = await caller.call(leaf, value)
                if code in _SERVER_ERRORS:
                    failed_at_edge.append((leaf.path, code))
        after = await stub.Submit(submit_request([4, 5], 2))
        # Assert
        assert len(leaves) > 50 and num_bad > 80
        assert refused_wrongly == []
        assert failed_at_edge == []
        assert after.request_id and cp.runtime.serving
        assert sum(cp.runtime.metrics.rebuilds.values.values()) == 0
    finally:
        await channel.close()
        await cp.stop()
