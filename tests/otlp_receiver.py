"""A real OTLP/gRPC trace collector on loopback, shared by the tests that check exported spans."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc


class OtlpReceiver:
    """A real OTLP/gRPC trace collector on loopback that keeps every exported span."""

    def __init__(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:`port` (0: any free port)."""
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans: list[Any] = []
        receiver = self

        class _Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(scope_spans.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """The URL exporters are given."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the collector."""
        self._server.stop(grace=0).wait()
