"""The Prometheus endpoint serves the exposition text over HTTP."""

from __future__ import annotations

import asyncio

from controlplane.api.metrics_http import CONTENT_TYPE, MetricsHttpServer
from controlplane.runtime.metrics import Metrics


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return head, body


async def test_metrics_endpoint_serves_text_and_404s_elsewhere():
    # Prepare
    metrics = Metrics()
    metrics.queue_depth.set(7, request_class="long")
    server = MetricsHttpServer(metrics.render, "127.0.0.1", 0)
    port = await server.start()
    try:
        # Execute
        head, body = await _get(port, "/metrics")
        missing, _ = await _get(port, "/other")
        # Assert
        assert head.startswith("HTTP/1.1 200") and CONTENT_TYPE in head
        assert 'pecsched_queue_depth{request_class="long"} 7' in body
        assert missing.startswith("HTTP/1.1 404")
    finally:
        await server.stop()
