"""An in-process control plane on loopback for tests: SQLite file database, real gRPC server."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine
from waiting import eventually

from controlplane.api.auth import Authenticator
from controlplane.api.server import ApiServer, tls_credentials
from controlplane.config import Config
from controlplane.core.config import SchedulerConfig
from controlplane.core.policies.registry import make_policy
from controlplane.runtime.clock import SystemClock
from controlplane.runtime.loop import Runtime
from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.sql_repository import SqlRepository
from controlplane.telemetry import Telemetry
from controlplane.text.codec import load_text_codec
from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

GENERAL = common_pb2.INSTANCE_ROLE_GENERAL
SHORT_DECODE = common_pb2.INSTANCE_ROLE_SHORT_DECODE
FINAL_STATES = {
    common_pb2.REQUEST_STATE_FINISHED,
    common_pb2.REQUEST_STATE_CANCELLED,
    common_pb2.REQUEST_STATE_FAILED,
}

# Small thresholds so "long" prompts are a few hundred tokens and prefill in several chunks.
TEST_SCHEDULER = SchedulerConfig(
    short_threshold_tokens=64,
    chunk_tokens=32,
    num_short_decode_instances=1,
    num_long_reserved_instances=1,
    max_pause_s=5.0,
)


def make_config(db_url: str, **overrides: Any) -> Config:
    """A Config for tests: fast ticks and heartbeats, loopback, auth off unless asked."""
    base = Config(
        db_url=db_url,
        listen="127.0.0.1:0",
        policy="fifo",
        auth_enabled=False,
        heartbeat_interval_s=0.2,
        tick_interval_s=0.05,
        registration_timeout_s=2.0,
        scheduler=TEST_SCHEDULER,
    )
    return replace(base, **overrides)


@dataclass
class ControlPlane:
    """A running control plane."""

    config: Config
    repo: SqlRepository
    runtime: Runtime
    api: ApiServer
    port: int
    telemetry: Telemetry

    @property
    def target(self) -> str:
        """host:port of the gRPC API."""
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop the server and the runtime."""
        await self.api.stop(0.2)
        await self.runtime.stop()
        self.telemetry.shutdown()
        self.repo.uow.engine.dispose()


def migrated_db(tmp_path: Path) -> str:
    """A fresh SQLite database at the head revision; returns its URL."""
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


async def start_control_plane(
    config: Config, telemetry: Telemetry | None = None, engine: Engine | None = None
) -> ControlPlane:
    """Build and start a control plane like the composition root does (on `engine` if given)."""
    telemetry = telemetry or Telemetry.noop()
    repo = SqlRepository(engine or make_engine(config.db_url))
    policy = make_policy(config.policy, config.scheduler, config.seed)
    runtime = Runtime(config, policy, repo, telemetry, SystemClock())
    await runtime.start()
    auth = Authenticator(repo if config.auth_enabled else None, None)
    tls = tls_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    api = ApiServer(runtime, auth, config.listen, load_text_codec(config), tls)
    port = await api.start()
    return ControlPlane(config, repo, runtime, api, port, telemetry)


def submit_request(
    prompt: list[int], max_new_tokens: int = 4, **fields: Any
) -> inference_pb2.SubmitRequest:
    """A SubmitRequest with token ids."""
    return inference_pb2.SubmitRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), max_new_tokens=max_new_tokens, **fields
    )


async def wait_all_final(
    stub: inference_pb2_grpc.InferenceStub,
    request_ids: list[str],
    timeout_s: float = 30.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, inference_pb2.Request]:
    """Poll Get until every request is in a final state; returns the last views."""
    views: dict[str, inference_pb2.Request] = {}

    async def all_final() -> bool:
        for rid in request_ids:
            if rid not in views or views[rid].state not in FINAL_STATES:
                views[rid] = await stub.Get(
                    inference_pb2.GetRequest(request_id=rid), metadata=metadata
                )
        return all(views[r].state in FINAL_STATES for r in request_ids)

    try:
        await eventually(all_final, "every request final", timeout_s)
    except AssertionError as e:
        pending = [v for v in views.values() if v.state not in FINAL_STATES]
        raise AssertionError(f"{e}: {pending[:3]}") from None
    return views


async def generate_all(
    stub: inference_pb2_grpc.InferenceStub, request_id: str, from_index: int = 0
) -> tuple[list[int], int]:
    """All tokens of a Generate stream from `from_index`, and the final state."""
    tokens: list[int] = []
    final = 0
    call = stub.Generate(
        inference_pb2.GenerateRequest(request_id=request_id, from_token_index=from_index)
    )
    async for chunk in call:
        assert chunk.start_index == from_index + len(tokens), chunk
        tokens.extend(chunk.token_ids)
        final = chunk.final_state or final
    return tokens, final


def grpc_code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status code of a failed call."""
    return exc.code()
