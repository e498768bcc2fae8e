"""Prompt token ids are checked at Submit against the vocabulary the served model's agents
report in Register (SQLite and PostgreSQL, real server on loopback)."""

from __future__ import annotations

import grpc
import pytest
from cp_harness import GENERAL, make_config, start_control_plane, submit_request
from cp_sim_agent import SimAgent

from controlplane.api.errors import ERROR_DETAIL_KEY
from protos.pecsched.v1 import common_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def _field(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value).field
    return ""


async def test_ids_outside_the_reported_vocabulary_are_refused_naming_the_field(db_url):
    # Prepare: no vocabulary configured; no agent yet
    cp = await start_control_plane(make_config(db_url))
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], vocab_size=100)
    other = SimAgent(cp.target, "node-b", [("b0", GENERAL, 4096)], vocab_size=200)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        before = await stub.Submit(submit_request([150], 1))  # vocabulary not known yet

        # Execute: an agent reports 100 tokens; another one reports 200
        await agent.start()
        at_limit = await stub.Submit(submit_request([0, 99], 1))
        with pytest.raises(grpc.aio.AioRpcError) as outside:
            await stub.Submit(submit_request([5, 100], 1))
        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await other.start()

        # Assert
        assert before.request_id and at_limit.request_id
        assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field(outside.value) == "prompt.token_ids"
        assert "100" in (outside.value.details() or "")
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _field(mismatch.value) == "vocab_size"
    finally:
        await channel.close()
        await other.stop()
        await agent.stop()
        await cp.stop()
