"""Requests flow through every policy: a real server on loopback and in-test agents."""

from __future__ import annotations

import random

import grpc
import pytest
from cp_harness import (
    GENERAL,
    SHORT_DECODE,
    generate_all,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent, expected_token

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("policy", ["fifo", "reservation", "priority", "pecsched"])
async def test_mixed_requests_finish_under_every_policy(tmp_path, policy):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path), policy=policy))
    agents = [
        SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096), ("a1", GENERAL, 4096)]),
        SimAgent(cp.target, "node-b", [("b0", GENERAL, 4096), ("b1", SHORT_DECODE, 4096)]),
    ]
    for agent in agents:
        await agent.start()
    rng = random.Random(7)
    prompts = [
        [rng.randrange(256) for _ in range(rng.choice([5, 20, 40, 150, 300]))] for _ in range(24)
    ]
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        ids = []
        for i, prompt in enumerate(prompts):
            response = await stub.Submit(submit_request(prompt, 6, priority=i % 3))
            ids.append(response.request_id)
        views = await wait_all_final(stub, ids)
        streamed = [await generate_all(stub, rid) for rid in ids]
        # Assert
        for rid, prompt, (tokens, final) in zip(ids, prompts, streamed, strict=True):
            assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED, views[rid]
            assert final == common_pb2.REQUEST_STATE_FINISHED
            assert tokens == [expected_token(prompt, i) for i in range(6)]
            assert views[rid].output_tokens == 6
            assert views[rid].timestamps.HasField("first_token")
        long_ids = [r for r, p in zip(ids, prompts, strict=True) if len(p) >= 64]
        assert all(views[r].request_class == common_pb2.REQUEST_CLASS_LONG for r in long_ids)
        kinds = {c.WhichOneof("kind") for agent in agents for c in agent.commands}
        if policy == "pecsched":  # shorts decode on the short-decode instance b1
            assert {"transfer_kv", "start_decode"} <= kinds
        resumed, _ = await generate_all(stub, ids[0], from_index=4)
        assert resumed == [expected_token(prompts[0], i) for i in (4, 5)]
    finally:
        await channel.close()
        for agent in agents:
            await agent.stop()
        await cp.stop()


async def test_generate_streams_tokens_live_and_text_prompts_use_bytes(tmp_path):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], token_s=0.01)
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        submitted = await stub.Submit(inference_pb2.SubmitRequest(text="héllo", max_new_tokens=12))
        tokens, final = await generate_all(stub, submitted.request_id)
        # Assert
        prompt = list("héllo".encode())
        assert submitted.prompt_tokens == len(prompt) == 6
        assert tokens == [expected_token(prompt, i) for i in range(12)]
        assert final == common_pb2.REQUEST_STATE_FINISHED
        text = cp.runtime.metrics.render()
        assert 'pecsched_tokens_total{kind="output",request_class="short"} 12' in text
        assert 'pecsched_jct_seconds_count{request_class="short"} 1' in text
        page = await stub.List(inference_pb2.ListRequest(page_size=10))
        assert [r.request_id for r in page.requests] == [submitted.request_id]
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()
