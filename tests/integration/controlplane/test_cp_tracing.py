"""Spans reach a real OTLP/gRPC receiver with parent/child links client -> control plane -> agent."""

from __future__ import annotations

import grpc
import pytest
from cp_harness import (
    GENERAL,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent
from otlp_receiver import OtlpReceiver
from waiting import eventually

from controlplane import telemetry as tm
from protos.pecsched.v1 import inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


async def test_spans_link_client_control_plane_and_agent(tmp_path):
    # Prepare: an OTLP receiver, a control plane exporting to it, an agent echoing contexts
    receiver = OtlpReceiver()  # a thread-pool server: exporters flush synchronously
    telemetry = tm.Telemetry.otlp(receiver.endpoint)
    agent_telemetry = tm.Telemetry.otlp(receiver.endpoint, service_name="agent")
    cp = await start_control_plane(make_config(migrated_db(tmp_path)), telemetry)
    echoed: list[str] = []

    def echo(command) -> None:  # the agent's span is a child of Command.trace
        parent = tm.parse_traceparent(command.trace.traceparent)
        span = agent_telemetry.start_span("agent.execute", parent=parent)
        echoed.append(span.context.traceparent)
        span.end()

    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], on_command=echo)
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    try:
        # Execute
        submitted = await stub.Submit(
            submit_request([1, 2, 3], 3), metadata=(("traceparent", traceparent),)
        )
        await wait_all_final(stub, [submitted.request_id])
        await agent.stop()
        await cp.stop()  # flushes the control plane's spans
        agent_telemetry.shutdown()
        await eventually(
            lambda: {"agent.execute", tm.SPAN_SUBMIT} <= {s.name for s in receiver.spans},
            "the agent's and the control plane's spans at the receiver",
        )
        # Assert
        spans = [s for s in receiver.spans if s.trace_id.hex() == CLIENT_TRACE_ID]
        by_id = {s.span_id.hex(): s for s in spans}
        names = {s.name for s in spans}
        submit = next(s for s in spans if s.name == tm.SPAN_SUBMIT)
        assert submit.parent_span_id.hex() == CLIENT_SPAN_ID
        assert {tm.SPAN_QUEUE, tm.SPAN_DISPATCH, "agent.execute"} <= names
        decision = next(s for s in spans if s.name.startswith(f"{tm.SPAN_DECISION}.start_prefill"))
        assert decision.parent_span_id == submit.span_id
        reason = {a.key: a.value.string_value for a in decision.attributes}[tm.ATTR_REASON]
        assert "a0" in reason
        agent_span = next(s for s in spans if s.name == "agent.execute")
        dispatch = by_id[agent_span.parent_span_id.hex()]
        assert dispatch.name == tm.SPAN_DISPATCH
        assert dispatch.parent_span_id == decision.span_id
        assert any(s.name.startswith(tm.SPAN_AGENT_EVENT) for s in spans)
        assert echoed
    finally:
        await channel.close()
        receiver.stop()
