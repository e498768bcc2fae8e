"""The asyncio client against a real gRPC server running the scripted fake control plane."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import grpc
import pytest
from sdk_fake_control_plane import API_KEY, Failure, FakeControlPlane, output_tokens, token_text

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from sdk.aio import AsyncClient
from sdk.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from sdk.retry import RetryPolicy
from sdk.types import RequestClass, RequestState, Sampling

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


async def test_submit_round_trip_sends_every_field(fake: FakeControlPlane, target: str) -> None:
    # Prepare
    deadline = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)

    # Execute
    async with AsyncClient(target, api_key=API_KEY, traceparent=TRACEPARENT) as client:
        ack = await client.submit(
            "a prompt",
            max_new_tokens=5,
            sampling=Sampling(temperature=1.5, top_p=0.5, seed=9, stop_at_eos=True),
            priority=4,
            tenant="acme",
            deadline=deadline,
            idempotency_key="key-a",
        )

    # Assert
    (call,) = fake.calls_of("Submit")
    sent = call.request
    assert isinstance(sent, inference_pb2.SubmitRequest)
    assert sent.text == "a prompt" and sent.max_new_tokens == 5
    assert (sent.sampling.temperature, sent.sampling.top_p, sent.sampling.seed) == (1.5, 0.5, 9)
    assert sent.sampling.stop_at_eos is True
    assert (sent.priority, sent.tenant, sent.idempotency_key) == (4, "acme", "key-a")
    assert sent.deadline.ToDatetime(tzinfo=UTC) == deadline
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    assert call.metadata["traceparent"] == TRACEPARENT
    assert (ack.request_id, ack.request_class, ack.prompt_tokens) == (
        "req-001",
        RequestClass.SHORT,
        8,
    )


async def test_generate_resumes_after_unavailable_without_duplicates(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare
    request_id = fake.add_request(prompt_tokens=4, max_new_tokens=9)
    fake.drop_after_chunks = [1, 2]

    # Execute
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        chunks = [chunk async for chunk in client.generate(request_id)]
        result = await client.result(request_id)

    # Assert
    expected = output_tokens(4, 9)
    from_indices = [c.request.from_token_index for c in fake.calls_of("Generate")]  # type: ignore[attr-defined]
    assert from_indices == [0, 2, 6, 0]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert [c.start_index for c in chunks] == list(range(0, 9, 2))
    assert "".join(c.text for c in chunks) == token_text(expected)
    assert result.token_ids == tuple(expected) and result.state is RequestState.FINISHED


async def test_retries_unavailable_then_succeeds(fake: FakeControlPlane, target: str) -> None:
    request_id = fake.add_request()
    fake.failures["Get"] = [Failure(grpc.StatusCode.UNAVAILABLE) for _ in range(2)]
    policy = RetryPolicy(initial_backoff_s=0.05, jitter=0.0)

    async with AsyncClient(target, retry=policy) as client:
        info = await client.get(request_id)

    arrivals = [c.at_s for c in fake.calls_of("Get")]
    assert info.request_id == request_id and len(arrivals) == 3
    assert arrivals[1] - arrivals[0] >= 0.05 and arrivals[2] - arrivals[1] >= 0.1


async def test_errors_map_to_typed_exceptions(fake: FakeControlPlane, target: str) -> None:
    # Prepare
    detail = common_pb2.ErrorDetail(code="PROMPT_TOO_LONG", field="prompt")
    fake.failures["Submit"] = [Failure(grpc.StatusCode.INVALID_ARGUMENT, "too long", detail)]

    # Execute / Assert
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(InvalidArgumentError) as raised:
            await client.submit("x" * 10, max_new_tokens=1)
        assert raised.value.field == "prompt"
        fake.api_key = API_KEY
        with pytest.raises(UnauthenticatedError):
            await client.get("req-001")
    assert len(fake.calls_of("Submit")) == 1


async def test_deadline_is_honored(fake: FakeControlPlane, target: str) -> None:
    fake.delay_s["Cancel"] = 2.0

    start = time.monotonic()
    async with AsyncClient(target, timeout_s=0.3) as client:
        with pytest.raises(DeadlineExceededError):
            await client.cancel("req-001")

    assert time.monotonic() - start < 1.5


async def test_gives_up_after_max_attempts(fake: FakeControlPlane, target: str) -> None:
    fake.failures["List"] = [Failure(grpc.StatusCode.UNAVAILABLE) for _ in range(5)]

    async with AsyncClient(target, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as c:
        with pytest.raises(UnavailableError):
            await c.list_page()

    assert len(fake.calls_of("List")) == 2


async def test_list_requests_and_watch(fake: FakeControlPlane, target: str) -> None:
    ids = [fake.add_request() for _ in range(5)]

    async with AsyncClient(target) as client:
        listed = [info.request_id async for info in client.list_requests(page_size=2)]
        stream = client.watch(interval_s=0.01)
        snapshots = [await anext(stream), await anext(stream)]
        await stream.aclose()

    assert listed == ids[::-1] and len(fake.calls_of("List")) == 3
    assert [s.num_preemptions_total for s in snapshots] == [0, 1]
    assert snapshots[0].classes[1].num_paused == 1


class _AioDetailServicer(inference_pb2_grpc.InferenceServicer):
    """A grpc.aio servicer that follows the documented error-detail convention."""

    async def Get(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        detail = common_pb2.ErrorDetail(code="BAD_REQUEST_ID", field="request_id")
        context.set_trailing_metadata((("pecsched-error-detail-bin", detail.SerializeToString()),))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is malformed")

    async def Cancel(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        detail = common_pb2.ErrorDetail(code="QUEUE_FULL", retry_after_s=1.25)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "busy",
            trailing_metadata=(("pecsched-error-detail-bin", detail.SerializeToString()),),
        )


async def test_error_detail_convention_works_from_a_grpc_aio_server() -> None:
    # Prepare
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(_AioDetailServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    # Execute
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(InvalidArgumentError) as invalid:
                await client.get("??")
            with pytest.raises(ResourceExhaustedError) as exhausted:
                await client.cancel("r")
    finally:
        await server.stop(grace=None)

    # Assert
    assert invalid.value.field == "request_id" and invalid.value.detail_code == "BAD_REQUEST_ID"
    assert exhausted.value.retry_after_s == 1.25
