"""The Attach link over TLS against a real TLS gRPC server on loopback: the server verified with
a CA file, mutual TLS with a client certificate, and refusals that leave the link retrying with
one warning naming the target."""

from __future__ import annotations

import logging
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import make_pki
from scripted import ScriptedControlPlane
from waiting import wait_until

from dataplane.agent.config import LinkTls, load_link_tls
from dataplane.agent.link import AttachLink, Connected
from protos.pecsched.v1 import cluster_pb2

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory)
    return directory


def serve(pki: Path, require_client_cert: bool) -> ScriptedControlPlane:
    pair = ((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())
    credentials = grpc.ssl_server_credentials(
        [pair],
        root_certificates=(pki / "ca.pem").read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    cp = ScriptedControlPlane()
    cp.start(credentials=credentials)
    return cp


@pytest.fixture
def links() -> Iterator[list[AttachLink]]:
    started: list[AttachLink] = []
    yield started
    for link in started:
        link.close(flush_timeout_s=1.0)


def attach(
    links: list[AttachLink], cp: ScriptedControlPlane, tls: LinkTls | None
) -> queue.Queue[Any]:
    inbox: queue.Queue[Any] = queue.Queue()
    link = AttachLink(f"127.0.0.1:{cp.port}", "secret", inbox, 1.0, tls)
    link.start()
    links.append(link)
    return inbox


def register(link_inbox: queue.Queue[Any], links: list[AttachLink]) -> None:
    connected = link_inbox.get(timeout=20)
    assert isinstance(connected, Connected), connected
    message = cluster_pb2.AgentMessage(register=cluster_pb2.Register(node_id="n1"))
    assert links[-1].send(connected.epoch, message)


def test_link_verifies_the_server_with_the_ca_file_and_sends_the_key(
    pki: Path, links: list[AttachLink]
) -> None:
    # Prepare
    cp = serve(pki, require_client_cert=False)
    tls = load_link_tls(False, str(pki / "ca.pem"), None, None)
    try:
        # Execute
        register(attach(links, cp, tls), links)
        # Assert
        cp.wait_for(lambda: cp.registers, 20, "the Register over TLS")
        assert cp.metadata[0]["authorization"] == "Bearer secret"
    finally:
        cp.stop()


def test_mutual_tls_admits_the_client_certificate_and_refuses_a_link_without_one(
    pki: Path, links: list[AttachLink], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    cp = serve(pki, require_client_cert=True)
    with_cert = load_link_tls(
        False, str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
    )
    without_cert = load_link_tls(False, str(pki / "ca.pem"), None, None)
    caplog.set_level(logging.WARNING, logger="pecsched.agent")
    try:
        # Execute
        refused = attach(links, cp, without_cert)
        plaintext = attach(links, cp, None)
        register(attach(links, cp, with_cert), links)
        # Assert: the certified link registers; the others log once and never connect
        cp.wait_for(lambda: cp.registers, 20, "the Register over mutual TLS")
        wait_until(
            lambda: sum("not reachable" in r.getMessage() for r in caplog.records) >= 2,
            "both refused links logged 'not reachable'",
            20,
        )
        warnings = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
        tls_hint = [w.endswith("over TLS (check its certificate); retrying") for w in warnings]
        assert sorted(tls_hint) == [False, True], warnings
        assert all(f"127.0.0.1:{cp.port}" in w for w in warnings)
        assert refused.empty() and plaintext.empty() and len(cp.registers) == 1
    finally:
        cp.stop()
