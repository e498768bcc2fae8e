"""The `@rpc` recipe ends a stream's span exactly once: at its end, on an error, and when grpc
abandons the generator because the client went away (it closes it at its `yield`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controlplane.api.recipe import Traced, rpc
from controlplane.core.errors import InvalidArgumentError
from controlplane.telemetry import Span, Telemetry


class _Context:
    """The calls the recipe makes on a grpc.aio servicer context."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code}")  # grpc raises AbortError here


class _Servicer(Traced):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    @rpc("test.stream")
    async def Stream(self, request: int, context: Any, span: Span) -> AsyncIterator[int]:  # noqa: N802
        for i in range(request):
            yield i
        raise InvalidArgumentError("request", "ran past its end")


@pytest.fixture
def spans() -> tuple[_Servicer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return _Servicer(Telemetry(provider.get_tracer("test"), provider)), exporter


async def test_an_abandoned_stream_ends_its_span_once(spans: Any) -> None:
    # Prepare
    servicer, exporter = spans
    stream = servicer.Stream(10, _Context())

    # Execute: read one item, then close the generator as grpc does on a client cancel
    assert await stream.__anext__() == 0
    await stream.aclose()

    # Assert
    (span,) = exporter.get_finished_spans()
    assert span.name == "test.stream" and span.attributes["pecsched.stream.abandoned"] is True


async def test_a_failing_stream_ends_its_span_once_with_the_error(spans: Any) -> None:
    # Prepare
    servicer, exporter = spans

    # Execute
    with pytest.raises(RuntimeError, match="aborted"):
        async for _ in servicer.Stream(2, _Context()):
            pass

    # Assert
    (span,) = exporter.get_finished_spans()
    assert not span.status.is_ok and "ran past its end" in (span.status.description or "")
