"""Statuses of hostile or unlucky inputs on a real server: each is a documented client error,
names the field, echoes nothing unbounded, and leaks no other tenant's data."""

from __future__ import annotations

import base64
import json
import re

import grpc
import pytest
from cp_harness import make_config, migrated_db, start_control_plane, submit_request

from controlplane.api.errors import ERROR_DETAIL_KEY
from controlplane.store.records import ApiKeyRole
from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(60)


async def _refused(call) -> tuple[grpc.StatusCode, common_pb2.ErrorDetail, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    detail = common_pb2.ErrorDetail()
    for key, value in info.value.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            detail = common_pb2.ErrorDetail.FromString(value)
    return info.value.code(), detail, info.value.details() or ""


async def test_bad_bytes_tokens_keys_intervals_and_page_tokens_get_client_errors(tmp_path):
    # Prepare
    config = make_config(migrated_db(tmp_path), vocab_size=100)
    cp = await start_control_plane(config)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    raw_submit = channel.unary_unary("/pecsched.v1.Inference/Submit")
    huge = json.dumps(["newest_first", 10**400, "x"]).encode()
    try:
        # Execute
        first = await stub.Submit(submit_request([1, 2], 2, idempotency_key="k"))
        same = await stub.Submit(submit_request([1, 2], 2, idempotency_key="k"))
        reused = await _refused(stub.Submit(submit_request([1, 3], 2, idempotency_key="k")))
        vocab = await _refused(stub.Submit(submit_request([5, 100], 2)))
        undecodable = await _refused(raw_submit(b"\x0a\xff\xff\xff\xff"))
        watch = await _refused(
            stub.Watch(inference_pb2.WatchRequest(interval_s=float("inf"))).read()
        )
        page = await _refused(
            stub.List(inference_pb2.ListRequest(page_token=base64.urlsafe_b64encode(huge).decode()))
        )
        long_id = await _refused(stub.Get(inference_pb2.GetRequest(request_id="r" * 100_000)))
        # Assert
        assert same.request_id == first.request_id and same.deduplicated
        assert reused[0] == grpc.StatusCode.ALREADY_EXISTS
        assert reused[1].code == "IDEMPOTENCY_KEY_REUSED" and reused[1].field == "idempotency_key"
        assert vocab[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert vocab[1].field == "prompt.token_ids"
        assert undecodable[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert undecodable[1].field == "request"
        assert (watch[0], watch[1].field) == (grpc.StatusCode.INVALID_ARGUMENT, "interval_s")
        assert (page[0], page[1].field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
        assert long_id[0] == grpc.StatusCode.INVALID_ARGUMENT and len(long_id[2]) < 100
        assert re.fullmatch(r"req-[0-9a-f]{32}", first.request_id)  # 128 random bits
    finally:
        await channel.close()
        await cp.stop()


async def test_another_tenants_request_is_not_found_like_a_missing_one(tmp_path):
    # Prepare
    cp = await start_control_plane(make_config(migrated_db(tmp_path), auth_enabled=True))
    _, acme_key = cp.repo.create_api_key(ApiKeyRole.CLIENT, "acme", 0.0)
    _, globex_key = cp.repo.create_api_key(ApiKeyRole.CLIENT, "globex", 0.0)
    acme = (("authorization", f"Bearer {acme_key}"),)
    globex = (("authorization", f"Bearer {globex_key}"),)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        rid = (await stub.Submit(submit_request([1], 2), metadata=acme)).request_id
        theirs = [
            await _refused(call(rid))
            for call in (
                lambda r: stub.Get(inference_pb2.GetRequest(request_id=r), metadata=globex),
                lambda r: stub.Cancel(inference_pb2.CancelRequest(request_id=r), metadata=globex),
            )
        ]
        missing = await _refused(
            stub.Get(inference_pb2.GetRequest(request_id="req-" + "0" * 32), metadata=globex)
        )
        other_tenant = await _refused(
            stub.Submit(submit_request([1], 2, tenant="acme"), metadata=globex)
        )
        # Assert
        for code, detail, message in theirs:
            assert (code, detail.code, message) == (missing[0], missing[1].code, missing[2])
            assert "acme" not in message and rid not in message
        assert missing[0] == grpc.StatusCode.NOT_FOUND
        assert other_tenant[0] == grpc.StatusCode.PERMISSION_DENIED
        assert "acme" not in other_tenant[2] and "globex" not in other_tenant[2]
    finally:
        await channel.close()
        await cp.stop()


async def test_the_prompt_byte_budget_refuses_with_a_retry_hint_per_tenant_and_globally(tmp_path):
    # Prepare: 10 tokens of prompt per tenant, 16 in all (4 bytes a token); no agents
    config = make_config(
        migrated_db(tmp_path), prompt_budget_bytes_per_tenant=40, prompt_budget_bytes=64
    )
    cp = await start_control_plane(config)
    channel = grpc.aio.insecure_channel(cp.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        # Execute
        await stub.Submit(submit_request(list(range(8)), 2))
        tenant = await _refused(stub.Submit(submit_request(list(range(3)), 2)))
        await stub.Submit(submit_request(list(range(8)), 2, tenant="b"))
        cluster = await _refused(stub.Submit(submit_request([1], 2, tenant="c")))
        exported = cp.runtime.metrics.render()
        # Assert
        for code, detail, _ in (tenant, cluster):
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert detail.code == "PROMPT_BUDGET" and detail.retry_after_s > 0
        assert "pecsched_prompt_bytes 64" in exported
    finally:
        await channel.close()
        await cp.stop()
