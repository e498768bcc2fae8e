"""Fixtures serving the scripted fake control plane (`sdk_fake_control_plane.py`) on loopback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from sdk_fake_control_plane import FakeControlPlane

from protos.pecsched.v1 import inference_pb2_grpc


def _serve(servicer: FakeControlPlane, credentials: object | None = None) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        yield f"{'localhost' if credentials else '127.0.0.1'}:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake() -> FakeControlPlane:
    """A fresh scripted control plane (not serving yet; use `target`)."""
    return FakeControlPlane()


@pytest.fixture
def target(fake: FakeControlPlane) -> Iterator[str]:
    """host:port of a real gRPC server on loopback serving `fake`."""
    yield from _serve(fake)


@pytest.fixture
def tls_target(fake: FakeControlPlane, tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """(host:port, certificate PEM) of a TLS server for `fake` with a self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    for address in _serve(fake, credentials):
        yield address, cert.read_bytes()
