"""The agent's work spans (dataplane.agent.tracing.WorkSpans) driven through AgentCore: what the
commands start on the workers is traced until the workers' answers, under the command's span."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_core import attach, command, make_core

from dataplane.agent.supervisor import WorkerDied, WorkerSaid
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2, common_pb2

TRACE_ID, DISPATCH_ID = "ab" * 16, "cd" * 8
TRACE = common_pb2.TraceContext(traceparent=f"00-{TRACE_ID}-{DISPATCH_ID}-01")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def traced_core(exporter: InMemorySpanExporter):  # type: ignore[no-untyped-def]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    core, ports = make_core(tracer=provider.get_tracer("test"))
    attach(core)
    return core, ports


def prefill(core, rid: str, instances: list[str], decode_in_place: bool = True) -> None:  # type: ignore[no-untyped-def]
    start = cluster_pb2.StartPrefill(
        request_id=rid,
        prompt_token_ids=[1, 2, 3],
        instance_ids=instances,
        max_new_tokens=4,
        decode_in_place=decode_in_place,
    )
    command(core, trace=TRACE, start_prefill=start)


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def test_prefill_chunks_and_decode_in_place_are_spans_under_the_command(
    exporter: InMemorySpanExporter,
) -> None:
    # Prepare
    core, _ = traced_core(exporter)
    # Execute: a traced StartPrefill, two chunks, the first token, decode to the end
    prefill(core, "r", ["n1/0"])
    core.handle(WorkerSaid(0, 0, m.PrefillChunkDone("r", 0, 2, 2, 0.25)))
    core.handle(WorkerSaid(0, 0, m.PrefillChunkDone("r", 1, 2, 3, 0.5)))
    core.handle(WorkerSaid(0, 0, m.PrefillDone("r", 3, 7)))
    assert "worker.decode" not in by_name(exporter), "decode runs until Finished"
    core.handle(WorkerSaid(0, 0, m.Finished("r", 4, "length")))
    # Assert
    spans = by_name(exporter)
    (cmd,) = spans["agent.start_prefill"]
    (work,) = spans["worker.prefill"]
    (decode,) = spans["worker.decode"]
    chunks = spans["worker.prefill_chunk"]
    assert cmd.context.trace_id == int(TRACE_ID, 16) and parent_of(cmd) == int(DISPATCH_ID, 16)
    assert parent_of(work) == cmd.context.span_id and parent_of(decode) == cmd.context.span_id
    assert [parent_of(c) for c in chunks] == [work.context.span_id] * 2
    assert [c.attributes["pecsched.chunk.index"] for c in chunks] == [0, 1]
    durations = [(c.end_time - c.start_time) / 1e9 for c in chunks]  # type: ignore[operator]
    assert durations == pytest.approx([0.25, 0.5])
    for span in (cmd, work, decode, *chunks):
        assert span.attributes["pecsched.request.id"] == "r"
        assert span.attributes["pecsched.node.id"] == "n1"
    assert list(work.attributes["pecsched.instance.ids"]) == ["n1/0"]
    assert decode.attributes["pecsched.output_tokens"] == 4
    assert decode.end_time >= work.end_time  # type: ignore[operator]


def test_pause_and_transfer_sides_end_on_the_workers_answers(
    exporter: InMemorySpanExporter,
) -> None:
    # Prepare: r held on n1/0 after its prefill
    core, _ = traced_core(exporter)
    prefill(core, "r", ["n1/0"], decode_in_place=False)
    # Execute: pause, resume, prefill ends, KV moves to n1/1 and decodes there
    command(core, pause=cluster_pb2.Pause(request_id="r"), trace=TRACE)
    assert "worker.pause" not in by_name(exporter), "the pause runs until Paused"
    core.handle(WorkerSaid(0, 0, m.Paused("r", 1)))
    command(core, resume=cluster_pb2.Resume(request_id="r"), trace=TRACE)
    core.handle(WorkerSaid(0, 0, m.PrefillDone("r", 3, 7)))
    kv = cluster_pb2.TransferKv(
        request_id="r", transfer_id="t", source_instance_id="n1/0", destination_instance_id="n1/1"
    )
    command(core, transfer_kv=kv, trace=TRACE)
    core.handle(WorkerSaid(0, 0, m.KvTransferUpdate("r", "t", "done", True, 640, 0.1, "")))
    core.handle(WorkerSaid(1, 0, m.KvTransferUpdate("r", "t", "done", False, 640, 0.1, "")))
    command(core, start_decode=cluster_pb2.StartDecode(request_id="r", transfer_id="t"))
    core.handle(WorkerSaid(1, 0, m.Finished("r", 4, "eos")))
    # Assert
    spans = by_name(exporter)
    (pause,) = spans["worker.pause"]
    (pause_cmd,) = spans["agent.pause"]
    assert parent_of(pause) == pause_cmd.context.span_id
    first, resumed = spans["worker.prefill"]
    assert (
        first.attributes["pecsched.paused"] is True and "pecsched.paused" not in resumed.attributes
    )
    (resume_cmd,) = spans["agent.resume"]
    assert parent_of(resumed) == resume_cmd.context.span_id
    (send,) = spans["worker.kv_send"]
    (recv,) = spans["worker.kv_recv"]
    (transfer_cmd,) = spans["agent.transfer_kv"]
    assert {parent_of(send), parent_of(recv)} == {transfer_cmd.context.span_id}
    assert send.attributes["pecsched.transfer.bytes"] == 640
    assert list(recv.attributes["pecsched.instance.ids"]) == ["n1/1"]
    (decode,) = spans["worker.decode"]
    assert parent_of(decode) == spans["agent.start_decode"][0].context.span_id


def test_a_worker_death_ends_its_requests_spans_with_an_error(
    exporter: InMemorySpanExporter,
) -> None:
    core, _ = traced_core(exporter)
    prefill(core, "r", ["n1/0", "n1/1"])
    core.handle(WorkerDied(1, 0, -9))
    (work,) = by_name(exporter)["worker.prefill"]
    assert work.status.status_code is StatusCode.ERROR and "died" in (work.status.description or "")
    assert list(work.attributes["pecsched.instance.ids"]) == ["n1/0", "n1/1"]
