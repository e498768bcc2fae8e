"""The project's SDK and CLI against the real control plane: results, typed errors with
details, listing newest first."""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE

import pytest
from cp_harness import GENERAL, make_config, migrated_db, start_control_plane
from cp_sim_agent import SimAgent, expected_token

from sdk.aio import AsyncClient
from sdk.errors import InvalidArgumentError, ResourceExhaustedError, UnauthenticatedError
from sdk.types import RequestState

pytestmark = pytest.mark.timeout(60)


async def test_sdk_submits_streams_and_gets_typed_errors(tmp_path):
    # Prepare
    config = make_config(migrated_db(tmp_path), max_active_requests_per_tenant=2)
    cp = await start_control_plane(config)
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], token_s=0.05)
    await agent.start()
    client = AsyncClient(cp.target, timeout_s=10)
    try:
        # Execute
        submitted = await client.submit("hi", max_new_tokens=5)
        again = await client.submit(
            "hi", max_new_tokens=5, idempotency_key=submitted.idempotency_key
        )
        result = await client.result(submitted.request_id)
        with pytest.raises(InvalidArgumentError) as bad:
            await client.submit([1, 2], max_new_tokens=10**6)
        await client.submit([1], max_new_tokens=50)
        await client.submit([2], max_new_tokens=50)
        with pytest.raises(ResourceExhaustedError) as full:
            await client.submit([3], max_new_tokens=50)
        # Assert
        assert again.deduplicated and again.request_id == submitted.request_id
        assert result.state is RequestState.FINISHED
        assert list(result.token_ids) == [expected_token(list(b"hi"), i) for i in range(5)]
        assert bad.value.field == "max_new_tokens" and bad.value.detail_code == "BAD_MAX_NEW_TOKENS"
        assert full.value.retry_after_s == pytest.approx(config.retry_after_s)
        assert full.value.detail_code == "TENANT_LIMIT"
    finally:
        await client.close()
        await agent.stop()
        await cp.stop()


async def test_sdk_without_key_is_unauthenticated(tmp_path):
    cp = await start_control_plane(make_config(migrated_db(tmp_path), auth_enabled=True))
    client = AsyncClient(cp.target, timeout_s=5)
    try:
        with pytest.raises(UnauthenticatedError):
            await client.submit("hi", max_new_tokens=2)
    finally:
        await client.close()
        await cp.stop()


async def _pecsched(*args: str) -> tuple[int, str, str]:
    """Run the `pecsched` CLI in a subprocess (the event loop keeps serving meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pecsched", *args, stdout=PIPE, stderr=PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_sdk_and_cli_list_newest_first(tmp_path):
    # Prepare: no agent, so everything stays queued
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    client = AsyncClient(cp.target, timeout_s=10)
    try:
        ids = [(await client.submit([i + 1], max_new_tokens=2)).request_id for i in range(5)]
        # Execute
        listed = [info.request_id async for info in client.list_requests(page_size=2)]
        first_three = [info.request_id async for info in client.list_requests(limit=3)]
        as_json = await _pecsched("list", "--target", cp.target, "--limit", "2", "--json")
        as_table = await _pecsched("list", "--target", cp.target)
        # Assert
        assert listed == ids[::-1]
        assert first_three == ids[::-1][:3]
        assert as_json[0] == 0, as_json[2]
        assert [r["request_id"] for r in json.loads(as_json[1])] == [ids[4], ids[3]]
        assert as_table[0] == 0, as_table[2]
        rows = [line.split()[0] for line in as_table[1].splitlines() if line.startswith("req-")]
        assert rows == ids[::-1]
    finally:
        await client.close()
        await cp.stop()
