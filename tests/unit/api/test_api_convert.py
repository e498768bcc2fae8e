"""Wire conversion: requests, commands, reports, registration and the byte tokenizer."""

from __future__ import annotations

import pytest

from controlplane.api import convert
from controlplane.api.errors import ApiError
from controlplane.core.types import RequestClass, RequestSpec, RequestState, RequestView, SpKind
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
from controlplane.runtime.reports import (
    Cancelled,
    Failed,
    Finished,
    KvTransferUpdate,
    Paused,
    PrefillChunkDone,
    PrefillDone,
    Tokens,
    TransferState,
)
from controlplane.store.records import SamplingParams
from controlplane.telemetry import TraceContext
from controlplane.text.codec import ByteCodec, ByteStreamDecoder
from dataplane.models.tokenizer import ByteTokenizer
from protos.pecsched.v1 import cluster_pb2, common_pb2

TRACE = TraceContext("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld ✓", "日本語", "\x00\n"])
def test_text_tokenizer_matches_the_data_plane_default(text):
    assert ByteCodec().encode(text) == ByteTokenizer().encode(text)
    ids = ByteCodec().encode(text) + [300]
    assert ByteStreamDecoder().feed(ids, final=True) == ByteTokenizer().decode(ids)


def test_stream_decoder_waits_for_split_characters():
    decoder = ByteStreamDecoder()
    ids = ByteCodec().encode("é")
    assert decoder.feed(ids[:1]) == ""
    assert decoder.feed(ids[1:]) == "é"


def test_request_view_to_proto_carries_times_and_instances():
    spec = RequestSpec("r1", "t", 10, 5, 2, 100.25, deadline_s=200.0)
    view = RequestView(
        spec,
        RequestClass.SHORT,
        RequestState.DECODING,
        first_scheduled_s=101.5,
        prefill_instance_ids=("a", "b"),
        decode_instance_ids=("c",),
        output_tokens=3,
        num_preemptions=1,
    )
    message = convert.request_to_proto(view)
    assert message.state == common_pb2.REQUEST_STATE_DECODING
    assert list(message.instance_ids) == ["a", "b", "c"]
    assert convert.timestamp_to_seconds(message.timestamps.arrival) == pytest.approx(100.25)
    assert message.timestamps.HasField("first_scheduled")
    assert not message.timestamps.HasField("finished")
    assert (message.preemptions, message.output_tokens, message.priority) == (1, 3, 2)


SAMPLING = SamplingParams(0.5, 0.9, 7, False)
PREFILL = PrefillOrder(
    "r", (1, 2), ("a", "b"), SpKind.RING, 32, "g", 8, SAMPLING, True, (5,), "n:1"
)


@pytest.mark.parametrize(
    ("order", "kind"),
    [
        (PREFILL, "start_prefill"),
        (ColocateOrder(PREFILL, 64), "colocate"),
        (PauseOrder("r"), "pause"),
        (ResumeOrder("r"), "resume"),
        (TransferOrder("r", "t1", "a", "c", "t1", "n:1", 5.0), "transfer_kv"),
        (DecodeOrder("r", "c", "t1", 8, SAMPLING, (5,)), "start_decode"),
        (CancelOrder("r"), "cancel"),
        (ShutdownOrder(True), "shutdown"),
    ],
)
def test_every_order_becomes_its_command(order, kind):
    message = convert.command_to_proto(AgentCommand("n", order, "r", TRACE), 9)
    assert message.seq == 9
    assert message.command.WhichOneof("kind") == kind
    assert message.command.trace.traceparent == TRACE.traceparent


def test_decode_command_names_its_instance():
    order = DecodeOrder("r", "c", "t1", 8, SAMPLING, (5,))
    d = convert.command_to_proto(AgentCommand("n", order, "r", None), 1).command.start_decode
    assert (d.instance_id, d.transfer_id, list(d.generated_token_ids)) == ("c", "t1", [5])


def test_prefill_command_fields():
    p = convert.command_to_proto(AgentCommand("n", PREFILL, "r", None), 1).command.start_prefill
    assert list(p.prompt_token_ids) == [1, 2] and list(p.generated_token_ids) == [5]
    assert p.sp_kind == common_pb2.SP_KIND_RING and p.decode_in_place
    assert p.sampling.temperature == pytest.approx(0.5) and not p.sampling.stop_at_eos
    assert (p.group_id, p.rendezvous_address) == ("g", "n:1")


def test_colocate_command_carries_the_mixed_batch_budget():
    order = ColocateOrder(PREFILL, 64, 2048)
    c = convert.command_to_proto(AgentCommand("n", order, "r", None), 1).command.colocate
    assert (c.iteration_prefill_budget_tokens, c.mixed_batch_tokens) == (64, 2048)


def test_chunk_event_keeps_its_iteration():
    chunk = cluster_pb2.PrefillChunkDone(
        chunk_index=1, chunks_total=3, duration_s=0.5, iteration=9, iteration_tokens=30,
        chunk_tokens=12,
    )  # fmt: skip
    body = convert.report_from_proto(cluster_pb2.Event(chunk_done=chunk), "n", 1.0).body
    assert body == PrefillChunkDone(1, 3, 0.5, 9, 30, 12)


@pytest.mark.parametrize(
    ("event", "body"),
    [
        (
            cluster_pb2.Event(chunk_done=cluster_pb2.PrefillChunkDone(chunk_index=2)),
            PrefillChunkDone,
        ),
        (
            cluster_pb2.Event(prefill_done=cluster_pb2.PrefillDone(first_token_id=4)),
            PrefillDone,
        ),
        (cluster_pb2.Event(paused=cluster_pb2.Paused(chunks_done=1)), Paused),
        (cluster_pb2.Event(tokens=cluster_pb2.Tokens(start_index=1, token_ids=[3])), Tokens),
        (cluster_pb2.Event(finished=cluster_pb2.Finished(output_tokens=2)), Finished),
        (cluster_pb2.Event(failed=cluster_pb2.Failed(error="x", retryable=True)), Failed),
        (cluster_pb2.Event(cancelled=cluster_pb2.Cancelled()), Cancelled),
    ],
)
def test_every_event_kind_becomes_a_report(event, body):
    event.request_id, event.instance_id = "r", "a"
    report = convert.report_from_proto(event, "n", 1.0)
    assert isinstance(report.body, body)
    assert (report.request_id, report.instance_id, report.node_id) == ("r", "a", "n")


def test_transfer_event_and_event_without_kind():
    event = cluster_pb2.Event(
        request_id="r",
        kv_transfer=cluster_pb2.KvTransferUpdate(
            transfer_id="t", state=common_pb2.TRANSFER_STATE_FAILED, error="boom"
        ),
    )
    body = convert.report_from_proto(event, "n", 1.0).body
    assert isinstance(body, KvTransferUpdate) and body.state is TransferState.FAILED
    with pytest.raises(ApiError):
        convert.report_from_proto(cluster_pb2.Event(request_id="r"), "n", 1.0)


def test_registration_validates_instances():
    register = cluster_pb2.Register(
        node_id="n",
        model="tiny",
        instances=[cluster_pb2.InstanceSpec(instance_id="a", kv_capacity_tokens=100)],
    )
    registration, join = convert.registration_from_proto(register, "peer", 5.0)
    assert registration.instance_ids == ("a",)
    assert join.instances[0].spec.tp == 1 and join.node.node_id == "n"
    for bad in (
        cluster_pb2.Register(node_id="n"),
        cluster_pb2.Register(node_id="", instances=register.instances),
        cluster_pb2.Register(node_id="n", instances=[cluster_pb2.InstanceSpec(instance_id="a")]),
        cluster_pb2.Register(node_id="n", instances=[register.instances[0]] * 2),
    ):
        with pytest.raises(ApiError) as info:
            convert.registration_from_proto(bad, "peer", 5.0)
        assert info.value.field.startswith("register")
