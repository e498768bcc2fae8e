"""A lost agent's work is re-queued and finishes on another agent."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest
from cp_harness import (
    GENERAL,
    SHORT_DECODE,
    TEST_SCHEDULER,
    generate_all,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent, expected_token
from waiting import eventually

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


async def _wait_running_on(stub, ids, node_prefix: str) -> None:
    """Wait until one of `ids` decodes on an instance whose id starts with `node_prefix`."""

    async def decoding_there() -> bool:
        for rid in ids:
            view = await stub.Get(inference_pb2.GetRequest(request_id=rid))
            if view.state == common_pb2.REQUEST_STATE_DECODING and any(
                i.startswith(node_prefix) for i in view.instance_ids
            ):
                return True
        return False

    await eventually(decoding_there, f"a request decoding on node {node_prefix}")


@pytest.mark.parametrize("how", ["stream closed", "heartbeats missed"])
async def test_lost_agent_work_is_requeued_and_finishes_elsewhere(tmp_path, how):
    # Prepare: slow decoding on node a; node b joins later
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    slow = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], token_s=0.05)
    await slow.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    prompts = [[i, i + 1, i + 2] for i in range(4)]
    ids = [(await stub.Submit(submit_request(p, 20))).request_id for p in prompts]
    await _wait_running_on(stub, ids, "a")
    other = SimAgent(cp.target, "node-b", [("b0", GENERAL, 4096)])
    try:
        # Execute
        if how == "stream closed":
            await slow.stop()
        else:  # silent for 3 heartbeat intervals (0.2 s): the control plane ends the stream
            slow.freeze()
            await asyncio.wait_for(slow.ended.wait(), timeout=5)
        await other.start()
        views = await wait_all_final(stub, ids)
        # Assert
        for rid, prompt in zip(ids, prompts, strict=True):
            view = views[rid]
            assert view.state == common_pb2.REQUEST_STATE_FINISHED
            tokens, _ = await generate_all(stub, rid)
            assert tokens == [expected_token(prompt, i) for i in range(20)]
        assert any(views[r].instance_ids == ["b0"] for r in ids)
        moved = [r for r in ids if views[r].instance_ids == ["b0"]]
        kinds = [e.kind.value for e in cp.repo.list_events(moved[0])]
        assert "requeued" in kinds and kinds[-1] == "finished"
    finally:
        await channel.close()
        await slow.stop()
        await other.stop()
        await cp.stop()


async def test_reconnecting_agent_is_told_to_drop_what_it_held(tmp_path):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    first = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], token_s=0.05)
    await first.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    rid = (await stub.Submit(submit_request([1, 2, 3], 10))).request_id
    await _wait_running_on(stub, [rid], "a")
    await first.stop()
    again = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)])
    again.resident = [rid]
    try:
        # Execute
        await again.start()
        views = await wait_all_final(stub, [rid])
        # Assert
        assert list(again.registered.drop_request_ids) == [rid]
        assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED
        tokens, _ = await generate_all(stub, rid)
        assert tokens == [expected_token([1, 2, 3], i) for i in range(10)]
    finally:
        await channel.close()
        await again.stop()
        await cp.stop()


async def test_repeated_retryable_failures_back_off_then_finish(tmp_path):
    # Prepare: the only instance refuses the first 4 prefills; the policy's refusal back-off
    # (0.1 s, doubling for each failure in a row) is what spaces the attempts
    scheduler = replace(TEST_SCHEDULER, refused_instance_backoff_s=0.1)
    cp = await start_control_plane(make_config(migrated_db(tmp_path), scheduler=scheduler))
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], fail_prefills=4)
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        rid = (await stub.Submit(submit_request([1, 2, 3], 3))).request_id
        views = await wait_all_final(stub, [rid])
        # Assert
        starts = [
            t
            for c, t in zip(agent.commands, agent.command_times, strict=True)
            if c.WhichOneof("kind") == "start_prefill"
        ]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED
        assert len(starts) == 5 and views[rid].output_tokens == 3
        assert gaps[2] >= 0.1 and gaps[3] >= 0.2  # 3rd and 4th failure backed off
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()


async def test_a_kv_transfer_nobody_reports_on_is_failed_and_retried(tmp_path):
    # Prepare: pecsched disaggregates shorts; the first transfer is never reported
    config = make_config(migrated_db(tmp_path), policy="pecsched", kv_transfer_timeout_s=0.2)
    cp = await start_control_plane(config)
    agent = SimAgent(
        cp.target,
        "node-a",
        [("g0", GENERAL, 4096), ("d0", SHORT_DECODE, 4096)],
        lose_transfers=1,
    )
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        rid = (await stub.Submit(submit_request([1, 2, 3], 3))).request_id
        views = await wait_all_final(stub, [rid])
        # Assert
        transfers = [c for c in agent.commands if c.WhichOneof("kind") == "transfer_kv"]
        assert len(transfers) == 2
        assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED
        kinds = [e.kind.value for e in cp.repo.list_events(rid)]
        assert kinds.count("kv_transfer_failed") == 1 and "kv_transfer_done" in kinds
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()
