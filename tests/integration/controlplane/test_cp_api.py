"""Client API behaviour: List paging and filters, Watch, Cancel of running work, deadlines,
text prompts refused for models with their own tokenizer."""

from __future__ import annotations

import time

import grpc
import pytest
from cp_harness import (
    GENERAL,
    make_config,
    migrated_db,
    start_control_plane,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent
from waiting import eventually

from controlplane.api.convert import seconds_to_timestamp
from controlplane.config import TextTokenizer
from controlplane.store import codec
from controlplane.store.records import ListOrder
from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


async def test_list_pages_newest_first_and_filters(db_url):
    # Prepare: no agents, every request stays queued
    cp = await start_control_plane(make_config(db_url))
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        ids = []
        for i in range(7):
            tenant = "a" if i % 2 == 0 else "b"
            prompt = [1] * (100 if i == 6 else 5)
            ids.append((await stub.Submit(submit_request(prompt, 2, tenant=tenant))).request_id)
        await stub.Cancel(inference_pb2.CancelRequest(request_id=ids[1]))
        # Execute: page through everything while two more requests arrive after page 1
        seen, token, late = [], "", []
        for _ in range(5):  # bounded: a token that does not advance fails instead of looping
            page = await stub.List(inference_pb2.ListRequest(page_size=3, page_token=token))
            seen.extend(r.request_id for r in page.requests)
            if not late:
                for prompt in ([7], [8]):
                    late.append((await stub.Submit(submit_request(prompt, 2))).request_id)
            token = page.next_page_token
            if not token:
                break
        fresh = await stub.List(inference_pb2.ListRequest(page_size=3))
        tenant_a = await stub.List(inference_pb2.ListRequest(tenant="a"))
        queued_long = await stub.List(
            inference_pb2.ListRequest(
                states=[common_pb2.REQUEST_STATE_QUEUED],
                request_class=common_pb2.REQUEST_CLASS_LONG,
            )
        )
        cancelled = await stub.List(
            inference_pb2.ListRequest(states=[common_pb2.REQUEST_STATE_CANCELLED])
        )
        oldest_first_token = codec.encode_page_token(ListOrder.OLDEST_FIRST, 0.0, ids[0])
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await stub.List(inference_pb2.ListRequest(page_token=oldest_first_token))
        # Assert: newest first, each request stored before page 1 exactly once, the late ones
        # only in the next listing
        assert seen == ids[::-1]
        assert [r.request_id for r in fresh.requests] == [late[1], late[0], ids[6]]
        assert fresh.next_page_token
        assert [r.request_id for r in tenant_a.requests] == [ids[6], ids[4], ids[2], ids[0]]
        assert [r.request_id for r in queued_long.requests] == [ids[6]]
        assert [r.request_id for r in cancelled.requests] == [ids[1]]
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_token.value.details().startswith("page_token: from a listing in oldest_first")
    finally:
        await channel.close()
        await cp.stop()


async def test_watch_cancel_running_and_deadline(tmp_path):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path)))
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 4096)], token_s=0.05)
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        running = (await stub.Submit(submit_request([1, 2], 50))).request_id
        deadline = seconds_to_timestamp(time.time() + 0.3)
        doomed = (await stub.Submit(submit_request([3, 4], 50, deadline=deadline))).request_id

        async def decoding() -> bool:
            view = await stub.Get(inference_pb2.GetRequest(request_id=running))
            return view.output_tokens >= 2

        await eventually(decoding, "the first request decodes")
        watch = stub.Watch(inference_pb2.WatchRequest(interval_s=0.1))
        snapshot = await watch.read()
        watch.cancel()
        # Execute
        cancelled = await stub.Cancel(inference_pb2.CancelRequest(request_id=running))
        views = await wait_all_final(stub, [running, doomed])
        await eventually(
            lambda: any(
                c.WhichOneof("kind") == "cancel" and c.cancel.request_id == running
                for c in agent.commands
            ),
            "the agent got a Cancel for the cancelled request",
        )
        # Assert
        assert snapshot.policy == "fifo" and [i.instance_id for i in snapshot.instances] == ["a0"]
        assert cancelled.state == common_pb2.REQUEST_STATE_CANCELLED
        assert "cancelled by admin" in cancelled.error
        assert views[doomed].state == common_pb2.REQUEST_STATE_FAILED
        assert "deadline" in views[doomed].error
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()


async def test_text_prompts_refused_when_the_model_has_its_own_tokenizer(tmp_path):
    config = make_config(migrated_db(tmp_path), text_tokenizer=TextTokenizer.NONE)
    cp = await start_control_plane(config)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(inference_pb2.SubmitRequest(text="hi", max_new_tokens=2))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "token_ids" in info.value.details()
        assert (await stub.Submit(submit_request([1], 2))).request_id
    finally:
        await channel.close()
        await cp.stop()
