"""The field-limit table covers every field a caller sends, and the walker enforces it."""

from __future__ import annotations

import math

import pytest
from google.protobuf.descriptor import FieldDescriptor

from controlplane.api import limits
from controlplane.api.errors import ApiError
from controlplane.store.tables import metadata
from protos.pecsched.v1 import cluster_pb2, common_pb2, inference_pb2

_SCALARS_WITHOUT_LIMIT = (
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_MESSAGE,
)


def request_types() -> list:
    """The input message of every method of the two services callers use."""
    services = (
        inference_pb2.DESCRIPTOR.services_by_name["Inference"],
        cluster_pb2.DESCRIPTOR.services_by_name["Cluster"],
    )
    return [method.input_type for service in services for method in service.methods]


def incoming_fields() -> list[FieldDescriptor]:
    """Every field reachable from a request message."""
    seen: set[str] = set()
    return [f for root in request_types() for f in limits.walk_fields(root, seen)]


def test_every_string_and_number_a_caller_sends_has_exactly_one_limit():
    # Prepare
    fields = incoming_fields()
    # Execute
    needing = {f.full_name for f in fields if f.type not in _SCALARS_WITHOUT_LIMIT}
    repeated_messages = {  # repeated messages and enums may carry an element count limit
        f.full_name for f in fields if f.type in _SCALARS_WITHOUT_LIMIT and f.is_repeated
    }
    # Assert
    assert needing - set(limits.LIMITS) == set()  # no field without a limit
    assert set(limits.LIMITS) - needing - repeated_messages == set()  # no stale entry


def test_text_limits_of_stored_values_are_the_column_sizes():
    # Prepare / Execute
    derived = [v for v in limits.LIMITS.values() if isinstance(v, limits.Text) and v.column]
    # Assert
    assert len(derived) >= 8
    for text in derived:
        table, column = text.column.split(".")
        assert metadata.tables[table].c[column].type.length == text.max_chars


def _refused(message) -> str:
    with pytest.raises(ApiError) as info:
        limits.check_message(message)
    assert info.value.field in str(info.value)
    return info.value.field


def test_the_walker_names_the_first_field_out_of_its_limit_and_never_echoes_it():
    # Prepare
    key_chars = limits.chars_of("requests.idempotency_key").max_chars
    node_chars = limits.chars_of("nodes.id").max_chars
    register = cluster_pb2.Register(
        node_id="n", instances=[cluster_pb2.InstanceSpec(instance_id="i" * 65)]
    )
    # Execute / Assert
    limits.check_message(inference_pb2.SubmitRequest(idempotency_key="k" * key_chars))
    assert _refused(inference_pb2.SubmitRequest(idempotency_key="k" * (key_chars + 1))) == (
        "idempotency_key"
    )
    assert _refused(inference_pb2.SubmitRequest(tenant="a\x00b")) == "tenant"
    assert _refused(inference_pb2.WatchRequest(interval_s=math.inf)) == "interval_s"
    assert _refused(inference_pb2.WatchRequest(interval_s=math.nan)) == "interval_s"
    sampling = common_pb2.SamplingParams(temperature=-1.0)
    assert _refused(inference_pb2.SubmitRequest(sampling=sampling)) == "sampling.temperature"
    assert _refused(inference_pb2.ListRequest(states=[1, 99])) == "states[1]"
    assert _refused(cluster_pb2.AgentMessage(register=register)) == (
        "register.instances[0].instance_id"
    )
    long_node = cluster_pb2.Register(node_id="n" * (node_chars + 1))
    with pytest.raises(ApiError) as info:
        limits.check_message(cluster_pb2.AgentMessage(register=long_node))
    assert "nnnn" not in info.value.message
    failed = cluster_pb2.Event(failed=cluster_pb2.Failed(error="x" * (limits.MAX_ERROR_CHARS + 1)))
    assert _refused(cluster_pb2.AgentMessage(event=failed)) == "event.failed.error"


def test_undecodable_bytes_become_a_refusal_naming_the_request():
    # Prepare
    decode = limits.lenient(inference_pb2.SubmitRequest.FromString, "Submit request")
    # Execute
    decoded = decode(b"\xff\xff\xff")
    # Assert
    with pytest.raises(ApiError) as info:
        limits.check_request(decoded)
    assert info.value.field == "request" and "Submit request" in info.value.message
