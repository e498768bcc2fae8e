"""Building the gRPC server: Inference, Cluster, health and reflection, behind auth.

Health follows the runtime: SERVING while it serves, NOT_SERVING while it rebuilds its state
from the database after a failed tick (the database is away) and during shutdown.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api.auth import Authenticator, add_authenticated
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
        tls: grpc.ServerCredentials | None = None,
    ) -> None:
        """`text_codec` tokenizes text and chat prompts (None: token ids only)."""
        self.runtime = runtime
        self.listen = listen
        self.tls = tls  # None: plaintext (TLS terminated in front, or local use)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.server = grpc.aio.server(options=options)
        telemetry = runtime.telemetry
        add_authenticated(
            inference_pb2_grpc.add_InferenceServicer_to_server,
            InferenceServicer(runtime, runtime.settings, telemetry, text_codec),
            self.server,
            authenticator,
        )
        add_authenticated(
            cluster_pb2_grpc.add_ClusterServicer_to_server,
            ClusterServicer(runtime, telemetry),
            self.server,
            authenticator,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._health_updates: set[asyncio.Task[None]] = set()
        runtime.serving_listeners.append(self._serving_changed)

    async def start(self) -> int:
        """Bind, start serving and report the runtime's health; returns the bound port."""
        if self.tls is None:
            self.port = self.server.add_insecure_port(self.listen)
        else:
            self.port = self.server.add_secure_port(self.listen, self.tls)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        await self._set_health(self.runtime.serving)
        return self.port

    def _serving_changed(self, serving: bool) -> None:
        task = asyncio.ensure_future(self._set_health(serving))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING and stop accepting calls (in-flight ones get `grace_s`)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def tls_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None
) -> grpc.ServerCredentials | None:
    """Server TLS credentials from PEM files (None without a certificate). With a client CA,
    every caller must present a certificate it signed (mutual TLS, e.g. for agents).

    Raises:
        OSError: a file cannot be read.
    """
    if cert_file is None or key_file is None:
        return None
    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        pair = (key.read(), cert.read())
    client_ca = None
    if client_ca_file is not None:
        with open(client_ca_file, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
