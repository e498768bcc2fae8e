"""The project's SDK against the real control plane: results, typed errors with details."""

from __future__ import annotations

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
