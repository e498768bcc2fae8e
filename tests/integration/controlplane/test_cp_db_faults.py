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
from dataclasses import dataclass, field

import grpc
import pytest
from cp_harness import (
    GENERAL,
    ControlPlane,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import Reattaching, SimAgent
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration.store.postgres import SERVER_URL, unique_database
from sqlalchemy import text
from sqlalchemy.engine import make_url
from waiting import eventually

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


@dataclass
class Flood:
    """What the flood and the watcher saw, for the faults to sequence on."""

    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> request id
    statuses: list[int] = field(default_factory=list)  # health statuses, in the order streamed
    faults_started: asyncio.Event = field(default_factory=asyncio.Event)  # the last one began

    async def until_acknowledged(self, count: int) -> None:
        """Wait until `count` submits were acknowledged."""
        await eventually(lambda: len(self.acknowledged) >= count, f"{count} submits acknowledged")

    async def until_not_serving(self, since: int) -> None:
        """Wait until health said NOT_SERVING after the first `since` statuses."""
        await eventually(
            lambda: NOT_SERVING in self.statuses[since:], "health NOT_SERVING during the fault"
        )


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOTAL = NUM_SUBMITTERS * SUBMITS_EACH


async def flood(stub: inference_pb2_grpc.InferenceStub, state: Flood) -> int:
    """Submit with idempotency keys, retrying UNAVAILABLE like the SDK, into
    `state.acknowledged`; returns how many attempts were refused as retryable. Each submitter's
    last submit waits until the last fault began, so the flood spans every fault."""
    refused = 0

    async def one(worker: int) -> None:
        nonlocal refused
        for i in range(SUBMITS_EACH):
            key = f"w{worker}-{i}"
            if i == SUBMITS_EACH - 1:
                await state.faults_started.wait()
            while True:
                try:
                    reply = await stub.Submit(
                        submit_request([worker, i, 7], 3, idempotency_key=key), timeout=20
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in _RETRYABLE, exc
                    refused += 1
                    await asyncio.sleep(0.05)  # the SDK's retry back-off (scenario, not a wait)
                    continue
                assert state.acknowledged.setdefault(key, reply.request_id) == reply.request_id
                break
            # a paced flood, not a burst: submits keep coming while a fault is injected
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one(w) for w in range(NUM_SUBMITTERS)))
    return refused


async def watch_health(channel: grpc.aio.Channel, state: Flood) -> None:
    """Record every health status the server streams, until cancelled."""
    health = health_pb2_grpc.HealthStub(channel)
    async for reply in health.Watch(health_pb2.HealthCheckRequest(service="")):
        state.statuses.append(reply.status)


async def run_with_faults(
    cp: ControlPlane, inject: Callable[[Flood], Awaitable[None]], rows: Callable[[], list[str]]
) -> None:
    """Flood while `inject` runs (it sets `faults_started` when the last fault begins); then
    check every acknowledged request finished exactly once."""
    agent = Reattaching(
        lambda: SimAgent(cp.target, "node-a", [("a0", GENERAL, 100_000)], token_s=0.001)
    )
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    state = Flood()
    watcher = asyncio.create_task(watch_health(channel, state))
    try:
        # Execute
        await asyncio.gather(flood(stub, state), inject(state))
        acknowledged = state.acknowledged
        views = await wait_all_final(stub, list(acknowledged.values()), timeout_s=60)
        # the last rebuild may still be backing off when the database is back
        await asyncio.wait_for(cp.runtime.until_serving(), timeout=30)
        stored = rows()
        # Assert: nothing acknowledged lost, nothing duplicated, serving again
        assert len(acknowledged) == TOTAL
        assert all(v.state == common_pb2.REQUEST_STATE_FINISHED for v in views.values())
        assert all(v.output_tokens == 3 for v in views.values())
        assert sorted(stored) == sorted(acknowledged.values())  # one row per key
        assert sum(cp.runtime.metrics.rebuilds.values.values()) >= 1
        assert NOT_SERVING in state.statuses
        assert cp.runtime.serving and agent.num_attaches >= 2
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
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

        async def inject(state: Flood) -> None:
            for k in range(1, 4):  # connections die; reconnecting works at once
                await state.until_acknowledged(k * TOTAL // 5)
                killed.append(await asyncio.to_thread(_kill_sessions, SERVER_URL, name))
            await state.until_acknowledged(4 * TOTAL // 5)
            since = len(state.statuses)
            await asyncio.to_thread(_allow_connections, SERVER_URL, name, False)
            killed.append(await asyncio.to_thread(_kill_sessions, SERVER_URL, name))
            state.faults_started.set()
            await state.until_not_serving(since)  # the database is away until that was seen
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

    async def inject(state: Flood) -> None:
        for k in (1, 2):  # the lock is held until the control plane said NOT_SERVING
            await state.until_acknowledged(k * TOTAL // 3)
            since = len(state.statuses)
            locker = sqlite3.connect(path, timeout=10, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            if k == 2:
                state.faults_started.set()
            await state.until_not_serving(since)
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
