"""Spans of a real cluster reach a real OTLP receiver: the agent's and its workers' spans sit in
the client's trace under the control plane's dispatch spans, with the request's id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_cluster import prompt_ids, start_cluster, tiny_agent
from otlp_receiver import OtlpReceiver

from controlplane import telemetry as tm
from pecsched.cluster import free_port
from sdk.client import Client
from sdk.types import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRACE_ID, CLIENT_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def _attrs(span: Any) -> dict[str, Any]:
    values = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        value = getattr(a.value, kind)
        values[a.key] = [v.string_value for v in value.values] if kind == "array_value" else value
    return values


def test_agent_and_worker_spans_arrive_under_the_control_planes_dispatch(tmp_path: Path) -> None:
    # Prepare: a cluster exporting to the receiver (a short prefills on a general worker in
    # 128-token chunks, then moves its KV to the short-decode worker)
    otlp_port = free_port()
    cluster = start_cluster(
        tmp_path,
        (tiny_agent("node-a", ("general", "short_decode")),),
        otlp_endpoint=f"http://127.0.0.1:{otlp_port}",
    )
    # Only now: a gRPC server running in this process while it forks the children can crash
    # them before exec (gRPC's fork handlers meet closed fds). Nothing is traced until Submit.
    otlp = OtlpReceiver(otlp_port)
    try:
        # Execute
        client = Client(
            cluster.target,
            api_key=cluster.client_key,
            timeout_s=30.0,
            traceparent=f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01",
        )
        with client:
            rid = client.submit(prompt_ids(1, 300), max_new_tokens=8).request_id
            result = client.result(rid, timeout_s=120)
        assert result.state is RequestState.FINISHED, result
    finally:
        cluster.local.stop()  # the agent and the control plane flush their spans on exit
        otlp.stop()

    # Assert
    spans = [s for s in otlp.spans if s.trace_id.hex() == TRACE_ID]
    by_id = {s.span_id: s for s in spans}
    names = {s.name for s in spans}
    agent_spans = [s for s in spans if s.name.startswith(("agent.", "worker."))]
    assert {"agent.start_prefill", "worker.prefill", "worker.prefill_chunk"} <= names, names
    assert "worker.decode" in names, names
    for span in agent_spans:
        attrs = _attrs(span)
        assert attrs[tm.ATTR_REQUEST_ID] == rid and attrs[tm.ATTR_NODE_ID] == "node-a", span.name
    commands = [s for s in agent_spans if s.name.startswith("agent.")]
    for command in commands:  # each command's span hangs off the control plane's dispatch
        assert by_id[command.parent_span_id].name == tm.SPAN_DISPATCH, command.name
    (prefill,) = [s for s in spans if s.name == "worker.prefill"]
    assert by_id[prefill.parent_span_id].name == "agent.start_prefill"
    chunks = [s for s in spans if s.name == "worker.prefill_chunk"]
    assert len(chunks) == 3, [_attrs(c) for c in chunks]  # 300 tokens in chunks of 128
    for chunk in chunks:
        assert chunk.parent_span_id == prefill.span_id
        assert chunk.end_time_unix_nano > chunk.start_time_unix_nano
        assert _attrs(chunk)[tm.ATTR_INSTANCE_IDS] == ["node-a/0"]
    (decode,) = [s for s in spans if s.name == "worker.decode"]
    (send,) = [s for s in spans if s.name == "worker.kv_send"]
    (recv,) = [s for s in spans if s.name == "worker.kv_recv"]
    assert _attrs(send)["pecsched.transfer.bytes"] > 0
    assert _attrs(recv)[tm.ATTR_INSTANCE_IDS] == ["node-a/1"]
    assert {by_id[s.parent_span_id].name for s in (send, recv)} == {"agent.transfer_kv"}
    assert by_id[decode.parent_span_id].name == "agent.start_decode"
