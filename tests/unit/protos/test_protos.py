"""The generated wire contract imports and round-trips messages."""

from __future__ import annotations

from protos.pecsched.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)


def test_submit_request_round_trips_through_bytes() -> None:
    # Prepare
    request = inference_pb2.SubmitRequest(
        token_ids=inference_pb2.TokenIds(ids=[1, 2, 3]),
        max_new_tokens=16,
        sampling=common_pb2.SamplingParams(temperature=0.7, top_p=0.9, seed=42),
        priority=2,
        tenant="acme",
        idempotency_key="k-1",
    )

    # Execute
    decoded = inference_pb2.SubmitRequest.FromString(request.SerializeToString())

    # Assert
    assert decoded == request
    assert decoded.WhichOneof("prompt") == "token_ids"
    assert list(decoded.token_ids.ids) == [1, 2, 3]
    assert decoded.sampling.seed == 42


def test_agent_command_oneof_round_trips() -> None:
    command = cluster_pb2.ControlMessage(
        seq=7,
        command=cluster_pb2.Command(
            start_prefill=cluster_pb2.StartPrefill(
                request_id="r1",
                prompt_token_ids=list(range(10)),
                instance_ids=["n0/0", "n0/1"],
                sp_kind=common_pb2.SP_KIND_ULYSSES,
                chunk_tokens=4,
            )
        ),
    )

    decoded = cluster_pb2.ControlMessage.FromString(command.SerializeToString())

    assert decoded.WhichOneof("body") == "command"
    assert decoded.command.WhichOneof("kind") == "start_prefill"
    assert list(decoded.command.start_prefill.instance_ids) == ["n0/0", "n0/1"]


def test_services_have_the_documented_methods() -> None:
    inference = common_pb2.DESCRIPTOR.pool.FindServiceByName("pecsched.v1.Inference")
    cluster = common_pb2.DESCRIPTOR.pool.FindServiceByName("pecsched.v1.Cluster")

    assert [m.name for m in inference.methods] == [
        "Submit",
        "Generate",
        "Get",
        "Cancel",
        "List",
        "Watch",
    ]
    assert [m.name for m in cluster.methods] == ["Attach"]
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert hasattr(cluster_pb2_grpc, "ClusterServicer")


def test_enums_start_with_unspecified_zero() -> None:
    for enum in common_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0
        assert enum.values[0].name.endswith("_UNSPECIFIED")
