"""The one recipe every servicer method follows: span -> validate/convert -> call -> convert.

`@rpc(span_name)` opens a span (a child of the caller's W3C `traceparent` metadata when
present) and hands it to the method, which converts the request, calls the runtime or the
repository and converts the answer. Before the method runs, the request (each message of a
client stream) is checked against the field limits of controlplane/api/limits.py. Any exception leaves through the error catalog
(`errors.abort_with`); the span records it. Works for unary methods and for async-generator
(streaming) methods alike; a stream the client abandons ends its span too.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from controlplane.api.errors import abort_with, resolve
from controlplane.api.limits import check_request, checked_stream
from controlplane.telemetry import (
    ATTR_ERROR_CODE,
    ATTR_RPC_METHOD,
    ATTR_STREAM_ABANDONED,
    Span,
    Telemetry,
    TraceContext,
    parse_traceparent,
)


class Traced:
    """Mixin of servicers: the telemetry their `@rpc` methods use."""

    telemetry: Telemetry


def caller_trace(context: Any) -> TraceContext | None:
    """The W3C trace context the client sent in metadata, if any."""
    traceparent, tracestate = None, ""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            traceparent = value
        elif key == "tracestate":
            tracestate = value
    parsed = parse_traceparent(traceparent)
    return None if parsed is None else TraceContext(parsed.traceparent, tracestate)


def _open(self: Traced, name: str, method: str, context: Any) -> Span:
    return self.telemetry.start_span(
        name, parent=caller_trace(context), attributes={ATTR_RPC_METHOD: method}, server=True
    )


async def _fail(span: Span, context: Any, exc: BaseException) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    resolved = resolve(exc)
    span.set_attribute(ATTR_ERROR_CODE, resolved.entry.name)
    span.set_error(resolved.message)
    span.end()
    await abort_with(context, exc)


def rpc(span_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a servicer method `(self, request, context, span)` with the recipe."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        method = fn.__name__
        if inspect.isasyncgenfunction(fn):

            async def stream(self: Traced, request: Any, context: Any) -> AsyncIterator[Any]:
                span = _open(self, span_name, method, context)
                try:
                    if hasattr(request, "__aiter__"):  # a client stream: checked per message
                        request = checked_stream(request)
                    else:
                        check_request(request)
                    async for item in fn(self, request, context, span):
                        yield item
                except Exception as exc:
                    await _fail(span, context, exc)
                except GeneratorExit:  # the client went away: grpc closed us at the `yield`
                    span.set_attribute(ATTR_STREAM_ABANDONED, True)
                    span.end()
                    raise
                span.end()

            stream.__name__ = method
            stream.__doc__ = fn.__doc__
            return stream

        async def unary(self: Traced, request: Any, context: Any) -> Any:
            span = _open(self, span_name, method, context)
            try:
                check_request(request)
                result = await fn(self, request, context, span)
            except Exception as exc:
                await _fail(span, context, exc)
            span.end()
            return result

        unary.__name__ = method
        unary.__doc__ = fn.__doc__
        return unary

    return wrap
