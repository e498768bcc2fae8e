"""Building the gRPC server: Inference, Cluster, health and reflection, behind auth."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api.auth import Authenticator, AuthInterceptor
from controlplane.api.cluster import ClusterServicer
from controlplane.api.inference import InferenceServicer
from controlplane.runtime.loop import Runtime
from controlplane.text.codec import TextCodec
from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc, inference_pb2, inference_pb2_grpc

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name,
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # long prompts travel as StartPrefill token ids


class ApiServer:
    """The control plane's gRPC server; `start()` binds and returns the port."""

    def __init__(
        self,
        runtime: Runtime,
        authenticator: Authenticator,
        listen: str,
        text_codec: TextCodec | None,
    ) -> None:
        """`text_codec` tokenizes text and chat prompts (None: token ids only)."""
        self.runtime = runtime
        self.listen = listen
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator)], options=options
        )
        telemetry = runtime.telemetry
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(runtime, runtime.settings, telemetry, text_codec), self.server
        )
        cluster_pb2_grpc.add_ClusterServicer_to_server(
            ClusterServicer(runtime, telemetry), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> int:
        """Bind, start serving and report SERVING; returns the bound port."""
        self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING and stop accepting calls (in-flight ones get `grace_s`)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
