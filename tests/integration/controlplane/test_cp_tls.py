"""TLS on the gRPC server: plaintext callers are refused; with a client CA (mutual TLS, e.g. for
agents) only callers presenting a certificate it signed get through."""

from __future__ import annotations

import shutil

import grpc
import pytest
from cp_harness import make_config, migrated_db, start_control_plane, submit_request
from pki import make_pki

from protos.pecsched.v1 import inference_pb2_grpc

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


async def _submit(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await inference_pb2_grpc.InferenceStub(channel).Submit(submit_request([1], 2), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    return grpc.StatusCode.OK


async def test_tls_server_refuses_plaintext_and_mutual_tls_refuses_callers_without_a_cert(
    tmp_path,
):
    # Prepare
    make_pki(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    client = ((tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes())
    tls = {
        "tls_cert_file": str(tmp_path / "server.pem"),
        "tls_key_file": str(tmp_path / "server.key"),
    }
    plain_cp = await start_control_plane(make_config(migrated_db(tmp_path), **tls))
    mutual_dir = tmp_path / "mutual"
    mutual_dir.mkdir()
    mutual_cp = await start_control_plane(
        make_config(migrated_db(mutual_dir), **tls, tls_client_ca_file=str(tmp_path / "ca.pem"))
    )
    try:
        # Execute
        secure = await _submit(
            grpc.aio.secure_channel(plain_cp.target, grpc.ssl_channel_credentials(ca))
        )
        plaintext = await _submit(grpc.aio.insecure_channel(plain_cp.target))
        no_cert = await _submit(
            grpc.aio.secure_channel(mutual_cp.target, grpc.ssl_channel_credentials(ca))
        )
        with_cert = await _submit(
            grpc.aio.secure_channel(
                mutual_cp.target, grpc.ssl_channel_credentials(ca, client[0], client[1])
            )
        )
        # Assert
        assert (secure, with_cert) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        assert plaintext == grpc.StatusCode.UNAVAILABLE
        assert no_cert == grpc.StatusCode.UNAVAILABLE
    finally:
        await plain_cp.stop()
        await mutual_cp.stop()
