"""PecSched on a live server: a short request preempts a running long prefill, which resumes."""

from __future__ import annotations

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


async def test_short_request_pauses_long_prefill_which_resumes_and_finishes(tmp_path):
    # Prepare: one general instance (prefills) and one short-decode instance
    # the short must pause the long: no prefill on the decoder, no preemption delay
    scheduler = replace(TEST_SCHEDULER, short_decode_colocation=False, short_preempt_delay_s=0.0)
    cp = await start_control_plane(
        make_config(migrated_db(tmp_path), policy="pecsched", scheduler=scheduler)
    )
    agent = SimAgent(
        cp.target, "node-a", [("g0", GENERAL, 8192), ("d0", SHORT_DECODE, 8192)], chunk_s=0.03
    )
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    long_prompt, short_prompt = [3] * 320, [5] * 10
    try:
        # Execute
        long_id = (await stub.Submit(submit_request(long_prompt, 4))).request_id

        async def long_ran_a_chunk() -> bool:  # before that it may not be paused
            view = await stub.Get(inference_pb2.GetRequest(request_id=long_id))
            return view.state == common_pb2.REQUEST_STATE_PREFILLING and view.chunks_done >= 1

        await eventually(long_ran_a_chunk, "the long request prefilled a chunk")
        short_id = (await stub.Submit(submit_request(short_prompt, 4))).request_id
        views = await wait_all_final(stub, [long_id, short_id])
        # Assert
        kinds = [c.WhichOneof("kind") for c in agent.commands]
        assert "pause" in kinds and "resume" in kinds
        assert kinds.index("pause") < kinds.index("resume")
        assert views[long_id].preemptions >= 1
        assert views[short_id].timestamps.finished.ToNanoseconds() < (
            views[long_id].timestamps.finished.ToNanoseconds()
        )
        for rid, prompt in ((long_id, long_prompt), (short_id, short_prompt)):
            assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED
            tokens, _ = await generate_all(stub, rid)
            assert tokens == [expected_token(prompt, i) for i in range(4)]
        timeline = [e.kind.value for e in cp.repo.list_events(long_id)]
        assert "paused" in timeline and "resumed" in timeline
        assert timeline.count("prefill_started") == 1  # resumed, not restarted
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()
