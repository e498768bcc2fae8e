"""Tracing for the control plane: the only module that imports OpenTelemetry.

`Telemetry` wraps one OpenTelemetry `TracerProvider` (not the global one, so several control
planes can live in one test process) that exports spans over OTLP/gRPC in batches. Without an
endpoint, or when OpenTelemetry is not installed, `Telemetry.noop()` gives spans that record
nothing but still carry a valid W3C `traceparent`, so trace context keeps flowing from clients
to agents. Span and attribute names are the constants below (docs/tracing.md lists them).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)

SERVICE_NAME = "pecsched-controlplane"

# ---- span names -----------------------------------------------------------------------------
SPAN_SUBMIT = "pecsched.submit"  # Inference.Submit: validate, persist, acknowledge
SPAN_QUEUE = "pecsched.queue"  # arrival -> first scheduled (or rejected/cancelled)
SPAN_SCHEDULE = "pecsched.schedule"  # one policy.schedule() call that decided something
SPAN_DECISION = "pecsched.decision"  # one action of a decision, child of the request's span
SPAN_DISPATCH = "pecsched.dispatch"  # one command sent to an agent (its context travels on)
SPAN_AGENT_EVENT = "pecsched.agent_event"  # an event an agent reported about a request
SPAN_RPC = "pecsched.rpc"  # other Inference RPCs (Get, Cancel, List)

# ---- attribute names ------------------------------------------------------------------------
ATTR_REQUEST_ID = "pecsched.request.id"
ATTR_TENANT = "pecsched.request.tenant"
ATTR_REQUEST_CLASS = "pecsched.request.class"
ATTR_PROMPT_TOKENS = "pecsched.request.prompt_tokens"
ATTR_DEDUPLICATED = "pecsched.submit.deduplicated"
ATTR_ACTION = "pecsched.action.kind"
ATTR_REASON = "pecsched.action.reason"
ATTR_INSTANCE_IDS = "pecsched.instance.ids"
ATTR_NODE_ID = "pecsched.node.id"
ATTR_EVENT = "pecsched.event.kind"
ATTR_NUM_ACTIONS = "pecsched.decision.num_actions"
ATTR_DECISION_S = "pecsched.decision.seconds"
ATTR_POLICY = "pecsched.policy"
ATTR_RPC_METHOD = "rpc.method"
ATTR_ERROR_CODE = "pecsched.error.code"
ATTR_STREAM_ABANDONED = "pecsched.stream.abandoned"  # the client went away mid-stream

AttributeValue = str | int | float | bool | list[str]


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context (what `Command.trace` and gRPC `traceparent` metadata carry)."""

    traceparent: str  # 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
    tracestate: str = ""  # vendor entries, passed through unchanged


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The context of a well-formed version-00 `traceparent`; None when absent or malformed."""
    if not value:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) != 4 or [len(p) for p in parts] != [2, 32, 16, 2]:
        return None
    if any(c not in "0123456789abcdef" for c in "".join(parts)):
        return None
    if parts[1] == "0" * 32 or parts[2] == "0" * 16 or parts[0] == "ff":
        return None
    return TraceContext("-".join(parts))


def _bits(n: int) -> int:
    """A random non-zero n-bit integer (W3C forbids all-zero ids)."""
    return random.getrandbits(n) or 1


class Span:
    """An open span; `end()` it exactly once. The no-op form only carries a context."""

    def __init__(self, context: TraceContext, otel_span: Any = None) -> None:
        self.context = context  # this span's own context (children and agents use it)
        self._otel = otel_span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Attach one attribute."""
        if self._otel is not None:
            self._otel.set_attribute(key, value)

    def set_error(self, message: str) -> None:
        """Mark the span failed with `message`."""
        if self._otel is not None:
            from opentelemetry.trace import Status, StatusCode

            self._otel.set_status(Status(StatusCode.ERROR, message))

    def end(self, end_s: float | None = None) -> None:
        """Close the span, at `end_s` (epoch seconds) or now."""
        if self._otel is not None:
            self._otel.end(end_time=None if end_s is None else int(end_s * 1e9))


class Telemetry:
    """Creates spans; build with `Telemetry.otlp(endpoint)` or `Telemetry.noop()`."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @staticmethod
    def noop() -> Telemetry:
        """Spans that export nothing but still propagate trace context."""
        return Telemetry()

    @staticmethod
    def otlp(endpoint: str, *, service_name: str = SERVICE_NAME) -> Telemetry:
        """Export spans in batches to the OTLP/gRPC collector at `endpoint` (http://host:4317).

        Falls back to `noop()` (with a warning) when OpenTelemetry's SDK is not installed.
        """
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:  # pragma: no cover - the SDK is a dependency
            _log.warning("OpenTelemetry SDK unavailable (%s); tracing disabled", exc)
            return Telemetry.noop()
        insecure = not endpoint.startswith("https://")
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        return Telemetry(provider.get_tracer("pecsched.controlplane"), provider)

    @property
    def is_recording(self) -> bool:
        """True when spans are exported."""
        return self._tracer is not None

    def start_span(
        self,
        name: str,
        *,
        parent: TraceContext | None = None,
        attributes: dict[str, AttributeValue] | None = None,
        start_s: float | None = None,
        server: bool = False,
    ) -> Span:
        """Open a span, child of `parent` when given (else a new trace).

        Args:
            name: one of the SPAN_* constants.
            parent: the remote or local parent context.
            attributes: initial attributes.
            start_s: start time in epoch seconds (default: now).
            server: mark it as the server side of an RPC.
        """
        if self._tracer is None:  # ids need uniqueness, not secrecy: no syscall per span
            trace_id = parent.traceparent.split("-")[1] if parent else f"{_bits(128):032x}"
            return Span(TraceContext(f"00-{trace_id}-{_bits(64):016x}-01"))
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = None
        if parent is not None:
            carrier = {"traceparent": parent.traceparent}
            if parent.tracestate:
                carrier["tracestate"] = parent.tracestate
            context = TraceContextTextMapPropagator().extract(carrier)
        kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
        otel_span = self._tracer.start_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            start_time=None if start_s is None else int(start_s * 1e9),
        )
        carrier_out: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier_out, context=trace.set_span_in_context(otel_span)
        )
        own = TraceContext(carrier_out["traceparent"], carrier_out.get("tracestate", ""))
        return Span(own, otel_span)

    def shutdown(self) -> None:
        """Flush pending spans and stop exporting."""
        if self._provider is not None:
            self._provider.force_flush()
            self._provider.shutdown()
