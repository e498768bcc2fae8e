"""The agent's spans: one per command, a child of the control plane's span via Command.trace.

`make_tracer(endpoint, node_id)` returns a tracer that exports over OTLP/gRPC in batches (and
a shutdown callable that flushes), or a no-op tracer when no endpoint is configured. The
provider is private to the agent (no global state), so several agents can share a process.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from protos.pecsched.v1 import cluster_pb2

_PROPAGATOR = TraceContextTextMapPropagator()


def make_tracer(endpoint: str | None, node_id: str) -> tuple[trace.Tracer, Callable[[], None]]:
    """(tracer, shutdown): OTLP batch export to `endpoint` (http://host:4317), else no-op."""
    if not endpoint:
        return trace.NoOpTracer(), lambda: None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "pecsched-agent", "pecsched.node_id": node_id})
    provider = TracerProvider(resource=resource)
    insecure = not endpoint.startswith("https://")
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return provider.get_tracer("pecsched.agent"), provider.shutdown


def command_span(
    tracer: trace.Tracer, command: cluster_pb2.Command, kind: str, request_id: str, node_id: str
) -> trace.Span:
    """A started span for `command`, parented by its W3C trace context when it carries one."""
    carrier = {"traceparent": command.trace.traceparent, "tracestate": command.trace.tracestate}
    parent = _PROPAGATOR.extract({k: v for k, v in carrier.items() if v})
    return tracer.start_span(
        f"agent.{kind}",
        context=parent,
        attributes={"pecsched.request_id": request_id, "pecsched.node_id": node_id},
    )
