"""Bad inputs, limits, idempotency, auth and health on a real server; nothing accepted is lost."""

from __future__ import annotations

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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.api.errors import ERROR_DETAIL_KEY
from controlplane.store.records import ApiKeyRole
from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def _detail(exc: grpc.aio.AioRpcError) -> common_pb2.ErrorDetail:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    raise AssertionError(f"no error detail in {exc}")


async def _expect(call, code: grpc.StatusCode) -> common_pb2.ErrorDetail:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value
    return _detail(info.value)


async def test_bad_inputs_get_invalid_argument_naming_the_field_and_nothing_is_lost(tmp_path):
    # Prepare
    config = make_config(migrated_db(tmp_path), max_new_tokens_limit=64, max_active_requests=30)
    cp = await start_control_plane(config)
    agent = SimAgent(cp.target, "node-a", [("a0", GENERAL, 1000)])
    await agent.start()
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    bad = [
        (inference_pb2.SubmitRequest(max_new_tokens=4), "prompt"),
        (inference_pb2.SubmitRequest(text="", max_new_tokens=4), "prompt"),
        (submit_request([1, 2], 0), "max_new_tokens"),
        (submit_request([1, 2], 65), "max_new_tokens"),
        (
            submit_request([1], 4, sampling=common_pb2.SamplingParams(temperature=-1)),
            "sampling.temperature",
        ),
        (
            submit_request([1], 4, sampling=common_pb2.SamplingParams(top_p=1.5)),
            "sampling.top_p",
        ),
        (submit_request(list(range(2000)), 4), "prompt"),  # the cluster holds 1000 tokens
    ]
    try:
        # Execute
        accepted = []
        for request, field in bad:
            good = await stub.Submit(submit_request([7, 8, 9], 3))
            accepted.append(good.request_id)
            detail = await _expect(stub.Submit(request), grpc.StatusCode.INVALID_ARGUMENT)
            # Assert
            assert detail.field == field, (request, detail)
        too_long = await _expect(
            stub.Submit(submit_request(list(range(2000)), 4)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert too_long.code == "PROMPT_TOO_LONG"
        views = await wait_all_final(stub, accepted)
        assert all(v.state == common_pb2.REQUEST_STATE_FINISHED for v in views.values())
        missing = await _expect(
            stub.Get(inference_pb2.GetRequest(request_id="nope")), grpc.StatusCode.NOT_FOUND
        )
        assert missing.code == "NOT_FOUND"
        bad_page = await _expect(
            stub.List(inference_pb2.ListRequest(page_token="garbage")),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert bad_page.field == "page_token"
    finally:
        await channel.close()
        await agent.stop()
        await cp.stop()


async def test_queue_limit_gives_resource_exhausted_with_retry_hint_and_idempotent_submit(tmp_path):
    # Prepare: no agent, so everything stays queued
    config = make_config(
        migrated_db(tmp_path), max_active_requests=5, max_active_requests_per_tenant=3
    )
    cp = await start_control_plane(config)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        first = await stub.Submit(submit_request([1], 2, idempotency_key="k1"))
        again = await stub.Submit(submit_request([1], 2, idempotency_key="k1"))
        for _ in range(2):
            await stub.Submit(submit_request([1], 2))
        tenant = await _expect(
            stub.Submit(submit_request([1], 2)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        for _ in range(2):
            await stub.Submit(submit_request([1], 2, tenant="other"))
        queue = await _expect(
            stub.Submit(submit_request([1], 2, tenant="third")), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        cancelled = await stub.Cancel(inference_pb2.CancelRequest(request_id=first.request_id))
        again_cancel = await stub.Cancel(inference_pb2.CancelRequest(request_id=first.request_id))
        # Assert
        assert again.request_id == first.request_id and again.deduplicated
        assert not first.deduplicated
        assert tenant.code == "TENANT_LIMIT" and tenant.retry_after_s > 0
        assert queue.code == "QUEUE_FULL" and queue.retry_after_s > 0
        assert cancelled.state == common_pb2.REQUEST_STATE_CANCELLED
        assert again_cancel.state == common_pb2.REQUEST_STATE_CANCELLED
        after = await stub.Submit(submit_request([1], 2, tenant="third"))
        assert after.request_id
    finally:
        await channel.close()
        await cp.stop()


async def test_api_keys_health_and_reflection(tmp_path):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path), auth_enabled=True))
    _, client_key = cp.repo.create_api_key(ApiKeyRole.CLIENT, "acme", 0.0)
    _, other_key = cp.repo.create_api_key(ApiKeyRole.CLIENT, "globex", 0.0)
    _, admin_key = cp.repo.create_api_key(ApiKeyRole.ADMIN, "ops", 0.0)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)

    def auth(key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    try:
        # Execute / Assert
        await _expect(stub.Submit(submit_request([1], 2)), grpc.StatusCode.UNAUTHENTICATED)
        await _expect(
            stub.Submit(submit_request([1], 2), metadata=auth("pecsched_0123456789abcdef_x")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        mine = await stub.Submit(submit_request([1], 2), metadata=auth(client_key))
        await _expect(  # another tenant's request looks exactly like a missing one
            stub.Get(
                inference_pb2.GetRequest(request_id=mine.request_id), metadata=auth(other_key)
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await _expect(
            stub.Submit(submit_request([1], 2, tenant="globex"), metadata=auth(client_key)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        watch = stub.Watch(inference_pb2.WatchRequest(), metadata=auth(client_key))
        await _expect(watch.read(), grpc.StatusCode.PERMISSION_DENIED)
        got = await stub.Get(
            inference_pb2.GetRequest(request_id=mine.request_id), metadata=auth(admin_key)
        )
        assert got.tenant == "acme"
        listed = await stub.List(inference_pb2.ListRequest(), metadata=auth(other_key))
        assert list(listed.requests) == []
        snapshots = stub.Watch(inference_pb2.WatchRequest(interval_s=0.1), metadata=auth(admin_key))
        snapshot = await snapshots.read()
        snapshots.cancel()
        assert snapshot.policy == "fifo"
        assert sum(c.queued for c in snapshot.classes) == 1
        agent = SimAgent(cp.target, "node-x", [("x0", GENERAL, 100)], api_key=client_key)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await agent.start()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await agent.stop()
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pecsched.v1.Inference", "pecsched.v1.Cluster"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert {"pecsched.v1.Inference", "pecsched.v1.Cluster"} <= names
    finally:
        await channel.close()
        await cp.stop()
