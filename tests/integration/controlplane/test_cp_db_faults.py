"""Database faults in the middle of a submit flood: the control plane never stops, health says
NOT_SERVING while the database is away, and no acknowledged request is lost or duplicated.

PostgreSQL: every connection of a uniquely named database is killed (`pg_terminate_backend`)
several times, and once the database refuses connections for a while. SQLite: another
process's connection holds the write lock longer than the busy timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable

import grpc
import pytest
from cp_harness import (
    GENERAL,
    ControlPlane,
    eventually,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration.store.postgres import SERVER_URL, unique_database
from sqlalchemy import text
from sqlalchemy.engine import make_url

from controlplane.api.auth import Authenticator
from controlplane.api.server import ApiServer
from controlplane.core.policies.registry import make_policy
from controlplane.runtime.clock import SystemClock
from controlplane.runtime.loop import Runtime
from controlplane.store.engine import make_engine
from controlplane.store.sql_repository import SqlRepository
from controlplane.telemetry import Telemetry
from controlplane.text.codec import load_text_codec
from protos.pecsched.v1 import common_pb2, inference_pb2_grpc
from protos.pecsched.v1.inference_pb2 import GetRequest

pytestmark = pytest.mark.timeout(120)

NUM_SUBMITTERS = 12
SUBMITS_EACH = 10
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Agent:
    """A sim agent that re-attaches whenever its stream ends (as real agents do)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.num_attaches = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            agent = SimAgent(self.target, "node-a", [("a0", GENERAL, 100_000)], token_s=0.001)
            try:
                await agent.start()
                self.num_attaches += 1
                await agent.ended.wait()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
            finally:
                await agent.stop()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def flood(stub: inference_pb2_grpc.InferenceStub) -> tuple[dict[str, str], int]:
    """Submit with idempotency keys, retrying UNAVAILABLE like the SDK; returns key -> id of
    every acknowledged submit and how many attempts were refused as retryable."""
    acknowledged: dict[str, str] = {}
    refused = 0

    async def one(worker: int) -> None:
        nonlocal refused
        for i in range(SUBMITS_EACH):
            key = f"w{worker}-{i}"
            while True:
                try:
                    reply = await stub.Submit(
                        submit_request([worker, i, 7], 3, idempotency_key=key), timeout=20
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in _RETRYABLE, exc
                    refused += 1
                    await asyncio.sleep(0.05)
                    continue
                assert acknowledged.setdefault(key, reply.request_id) == reply.request_id
                break
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one(w) for w in range(NUM_SUBMITTERS)))
    return acknowledged, refused


async def watch_health(channel: grpc.aio.Channel, seen: set[int], stop: asyncio.Event) -> None:
    """Record every health status until `stop`."""
    health = health_pb2_grpc.HealthStub(channel)
    while not stop.is_set():
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        seen.add(reply.status)
        await asyncio.sleep(0.02)


async def run_with_faults(
    cp: ControlPlane, inject: Callable[[], Awaitable[None]], rows: Callable[[], list[str]]
) -> None:
    """Flood while `inject` runs; then check every acknowledged request finished exactly once."""
    agent = Agent(cp.target)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    seen: set[int] = set()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_health(channel, seen, stop))
    try:
        # Execute
        (acknowledged, _), _ = await asyncio.gather(flood(stub), inject())
        views = await wait_all_final(stub, list(acknowledged.values()), timeout_s=60)
        # the last rebuild may still be backing off when the database is back
        await asyncio.wait_for(cp.runtime.until_serving(), timeout=30)
        stop.set()
        await watcher
        stored = rows()
        # Assert: nothing acknowledged lost, nothing duplicated, serving again
        assert len(acknowledged) == NUM_SUBMITTERS * SUBMITS_EACH
        assert all(v.state == common_pb2.REQUEST_STATE_FINISHED for v in views.values())
        assert all(v.output_tokens == 3 for v in views.values())
        assert sorted(stored) == sorted(acknowledged.values())  # one row per key
        assert sum(cp.runtime.metrics.rebuilds.values.values()) >= 1
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        assert cp.runtime.serving and agent.num_attaches >= 2
    finally:
        stop.set()
        watcher.cancel()
        await agent.stop()
        await channel.close()
        await cp.stop()


def _kill_sessions(admin_url: str, name: str) -> int:
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return len(
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                ).all()
            )
    finally:
        admin.dispose()


def _allow_connections(admin_url: str, name: str, allow: bool) -> None:
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow)}'))
    finally:
        admin.dispose()


@pytest.mark.postgres
async def test_killed_postgres_connections_mid_flood_lose_and_duplicate_nothing():
    with unique_database() as url:
        # Prepare
        name = make_url(url).database
        cp = await start_control_plane(make_config(url))
        killed: list[int] = []

        async def inject() -> None:
            for _ in range(3):  # connections die; reconnecting works at once
                await asyncio.sleep(0.4)
                killed.append(await asyncio.to_thread(_kill_sessions, SERVER_URL, name))
            await asyncio.to_thread(_allow_connections, SERVER_URL, name, False)
            killed.append(await asyncio.to_thread(_kill_sessions, SERVER_URL, name))
            await asyncio.sleep(1.0)  # the database is away
            await asyncio.to_thread(_allow_connections, SERVER_URL, name, True)

        def rows() -> list[str]:
            engine = make_engine(url)
            try:
                with engine.connect() as connection:
                    return list(connection.execute(text("SELECT id FROM requests")).scalars())
            finally:
                engine.dispose()

        # Execute / Assert
        await run_with_faults(cp, inject, rows)
        assert sum(killed) >= 3  # sessions of the control plane were killed


async def test_a_locked_sqlite_database_mid_flood_loses_and_duplicates_nothing(tmp_path):
    # Prepare: statements give up on another process's lock after 100 ms
    url = migrated_db(tmp_path)
    path = make_url(url).database
    cp = await start_control_plane(
        make_config(url), engine=make_engine(url, sqlite_busy_timeout_ms=100)
    )

    async def inject() -> None:
        for hold_s in (0.5, 1.0):
            await asyncio.sleep(0.4)
            locker = sqlite3.connect(path, timeout=10, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            await asyncio.sleep(hold_s)
            locker.execute("ROLLBACK")
            locker.close()

    def rows() -> list[str]:
        with sqlite3.connect(path) as connection:
            return [r[0] for r in connection.execute("SELECT id FROM requests")]

    # Execute / Assert
    await run_with_faults(cp, inject, rows)


async def test_the_port_opens_before_recovery_and_calls_wait_for_it(tmp_path):
    # Prepare: an unfinished request in the database, a server whose runtime has not started
    first = await start_control_plane(make_config(migrated_db(tmp_path)))
    old = await inference_pb2_grpc.InferenceStub(grpc.aio.insecure_channel(first.target)).Submit(
        submit_request([1, 2], 3)
    )
    await first.stop()
    config = make_config(first.config.db_url)
    repo = SqlRepository(make_engine(config.db_url))
    runtime = Runtime(config, make_policy("fifo"), repo, Telemetry.noop(), SystemClock())
    api = ApiServer(runtime, Authenticator(None, None), config.listen, load_text_codec(config))
    port = await api.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        # Execute
        before = (await health.Check(health_pb2.HealthCheckRequest())).status
        submit = asyncio.ensure_future(stub.Submit(submit_request([3, 4], 3)))
        await eventually(
            lambda: runtime.admission.prompt_bytes() > 0, "the submit waits in the runtime"
        )
        waited = not submit.done()
        recovered = await runtime.start()
        reply = await asyncio.wait_for(submit, 10)
        after = (await health.Check(health_pb2.HealthCheckRequest())).status
        # Assert
        assert before == health_pb2.HealthCheckResponse.NOT_SERVING
        assert after == health_pb2.HealthCheckResponse.SERVING
        assert waited and reply.request_id and recovered == 1
        assert (await stub.Get(GetRequest(request_id=old.request_id))).request_id
    finally:
        await channel.close()
        await api.stop(0.2)
        await runtime.stop()
        repo.uow.engine.dispose()
