"""The agent's spans: one per command, a child of the control plane's span via Command.trace,
and under it the work the command started on the workers, each open until the workers' answer.

| span | parent | from -> to |
|---|---|---|
| `agent.<kind>` | `Command.trace` (the CP's dispatch) | the command's routing (instant) |
| `worker.prefill` | `agent.start_prefill`, `.colocate` or `.resume` | the worker command -> PrefillDone, Paused or the request's end |
| `worker.prefill_chunk` | `worker.prefill` | one per chunk, as the worker timed it |
| `worker.pause` | `agent.pause` | Pause sent -> Paused |
| `worker.decode` | the in-place prefill's command, or `agent.start_decode` | PrefillDone / StartDecode -> Finished or the request's end |
| `worker.kv_send`, `worker.kv_recv` | `agent.transfer_kv` | this side's SendKv / RecvKv -> its DONE or FAILED |
| `worker.cancel` | `agent.cancel` | Cancel sent -> every holder's Cancelled |

Every span has `pecsched.request.id` and `pecsched.node.id` (the control plane's attribute
names); work spans add `pecsched.instance.ids` and, at their end, what the worker reported
(chunk index and tokens, transfer bytes, output tokens). A request's Failed event (a worker
death, a hand-back, a failed command) ends all its spans with an error status.

`make_tracer(endpoint, node_id)` returns a tracer that exports over OTLP/gRPC in batches (and
a shutdown callable that flushes), or a no-op tracer when no endpoint is configured. The
provider is private to the agent (no global state), so several agents can share a process.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dataplane.agent.steps import Step
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2

_PROPAGATOR = TraceContextTextMapPropagator()

REQUEST_ID = "pecsched.request.id"  # the control plane's attribute names
NODE_ID = "pecsched.node.id"
INSTANCE_IDS = "pecsched.instance.ids"


def make_tracer(endpoint: str | None, node_id: str) -> tuple[trace.Tracer, Callable[[], None]]:
    """(tracer, shutdown): OTLP batch export to `endpoint` (http://host:4317), else no-op."""
    if not endpoint:
        return trace.NoOpTracer(), lambda: None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "pecsched-agent", NODE_ID: node_id})
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
        attributes={REQUEST_ID: request_id, NODE_ID: node_id},
    )


class WorkSpans:
    """The work spans of the module docstring, driven by the agent's router steps.

    `observe(step, parent)` opens spans for the worker commands of a step (under `parent`, the
    command's span) and closes them on its events; `transfer_report` closes a transfer side
    (the sender's DONE is no event). Called from the agent's main loop only.
    """

    def __init__(self, tracer: trace.Tracer, node_id: str, instance_id: Callable[[int], str]):
        self._tracer = tracer
        self._node_id = node_id
        self._instance_id = instance_id
        self._open: dict[tuple[str, str], trace.Span] = {}  # (request, name[/transfer]) -> span
        self._decode_parent: dict[str, otel_context.Context] = {}  # in-place prefills

    def observe(self, step: Step, parent: otel_context.Context | None = None) -> None:
        """Close spans on `step`'s events, then open spans for its worker commands."""
        for event in step.events:
            self._on_event(event)
        opened: dict[tuple[str, str], list[int]] = {}  # (request, span key) -> workers
        for index, cmd in step.to_workers:
            if isinstance(cmd, m.Stop):
                continue
            if isinstance(cmd, m.Cancel):
                self._end_request(cmd.request_id, "dropped" if cmd.silent else "cancelled")
                if cmd.silent:
                    continue
            key = _span_key(cmd)
            if key is None:
                continue
            opened.setdefault((cmd.request_id, key), []).append(index)
            if parent is not None and _decodes_in_place(cmd):
                self._decode_parent[cmd.request_id] = parent
        for (rid, key), workers in opened.items():
            self._start(rid, key, parent, [self._instance_id(i) for i in workers])

    def transfer_report(self, report: m.KvTransferUpdate) -> None:
        """One side of a transfer reported DONE or FAILED: end that side's span."""
        if report.state == "transferring":
            return
        side = "worker.kv_send" if report.is_source else "worker.kv_recv"
        span = self._open.pop((report.request_id, f"{side}/{report.transfer_id}"), None)
        if span is not None:
            span.set_attribute("pecsched.transfer.bytes", report.num_bytes)
            if report.error:
                span.set_status(trace.StatusCode.ERROR, report.error)
            span.end()

    def end_all(self) -> None:
        """End every open span (the agent exits)."""
        for span in self._open.values():
            span.end()
        self._open.clear()

    def _start(
        self,
        request_id: str,
        key: str,
        parent: otel_context.Context | None,
        instance_ids: list[str],
    ) -> None:
        old = self._open.pop((request_id, key), None)
        if old is not None:
            old.end()  # superseded: a newer command for the same work
        name, _, transfer_id = key.partition("/")
        attributes: dict[str, str | list[str]] = {
            REQUEST_ID: request_id,
            NODE_ID: self._node_id,
            INSTANCE_IDS: instance_ids,
        }
        if transfer_id:
            attributes["pecsched.transfer.id"] = transfer_id
        self._open[(request_id, key)] = self._tracer.start_span(
            name, context=parent, attributes=attributes
        )

    # ------------------------------------------------------------------ closing
    def _on_event(self, event: cluster_pb2.Event) -> None:
        rid, kind = event.request_id, event.WhichOneof("kind")
        end_ns = int(event.at_s * 1e9)
        if kind == "chunk_done":
            prefill = self._open.get((rid, "worker.prefill"))  # rank 0 reports an SP group's
            if prefill is None:
                return
            done = event.chunk_done
            start_ns = end_ns - int(done.duration_s * 1e9)
            chunk = self._tracer.start_span(
                "worker.prefill_chunk",
                context=trace.set_span_in_context(prefill),
                start_time=start_ns,
                attributes={
                    REQUEST_ID: rid,
                    NODE_ID: self._node_id,
                    INSTANCE_IDS: [event.instance_id],
                    "pecsched.chunk.index": done.chunk_index,
                    "pecsched.chunk.total": done.chunks_total,
                    "pecsched.chunk.tokens_done": done.tokens_done,
                },
            )
            chunk.end(end_time=end_ns)
        elif kind == "prefill_done":
            self._end(rid, "worker.prefill", end_ns)
            parent = self._decode_parent.pop(rid, None)
            if parent is not None:
                self._start(rid, "worker.decode", parent, [event.instance_id])
        elif kind == "paused":
            self._end(rid, "worker.pause", end_ns)
            self._end(rid, "worker.prefill", end_ns, {"pecsched.paused": True})
        elif kind == "finished":
            attrs = {"pecsched.output_tokens": event.finished.output_tokens}
            self._end(rid, "worker.decode", end_ns, attrs)
            self._end_request(rid, "finished")
        elif kind == "failed":
            self._end_request(rid, event.failed.error, error=True)
        elif kind == "cancelled":
            self._end(rid, "worker.cancel", end_ns)

    def _end(
        self, request_id: str, name: str, end_ns: int, attrs: dict[str, int | bool] | None = None
    ) -> None:
        span = self._open.pop((request_id, name), None)
        if span is not None:
            for key, value in (attrs or {}).items():
                span.set_attribute(key, value)
            span.end(end_time=end_ns)

    def _end_request(self, request_id: str, why: str, *, error: bool = False) -> None:
        """End every open span of the request."""
        self._decode_parent.pop(request_id, None)
        for key in [k for k in self._open if k[0] == request_id]:
            span = self._open.pop(key)
            if error:
                span.set_status(trace.StatusCode.ERROR, why)
            else:
                span.set_attribute("pecsched.ended_by", why)
            span.end()


def _decodes_in_place(cmd: m.WorkerCommand) -> bool:
    """A prefill that decodes where it ran (an SP group always does)."""
    return isinstance(cmd, m.SpPrefill) or (isinstance(cmd, m.Prefill) and cmd.decode_in_place)


def _span_key(cmd: m.WorkerCommand) -> str | None:
    """The work span a worker command opens: its name, "/<transfer id>" for a transfer side."""
    if isinstance(cmd, m.Prefill | m.SpPrefill | m.Resume):
        return "worker.prefill"
    if isinstance(cmd, m.Pause):
        return "worker.pause"
    if isinstance(cmd, m.StartDecode):
        return "worker.decode"
    if isinstance(cmd, m.SendKv):
        return f"worker.kv_send/{cmd.transfer_id}"
    if isinstance(cmd, m.RecvKv):
        return f"worker.kv_recv/{cmd.transfer_id}"
    if isinstance(cmd, m.Cancel):
        return "worker.cancel"
    return None
