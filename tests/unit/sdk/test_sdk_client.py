"""The sync client against a real gRPC server running the scripted fake control plane."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from datetime import UTC, datetime

import grpc
import pytest
from sdk_fake_control_plane import API_KEY, Failure, FakeControlPlane, output_tokens, token_text
from waiting import wait_until

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from sdk.client import Client
from sdk.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from sdk.retry import RetryPolicy
from sdk.types import RequestClass, RequestState, Sampling

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


def unavailable(n: int) -> list[Failure]:
    return [Failure(grpc.StatusCode.UNAVAILABLE, "control plane restarting") for _ in range(n)]


def test_submit_round_trip_sends_every_field(fake: FakeControlPlane, target: str) -> None:
    # Prepare
    deadline = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    sampling = Sampling(temperature=0.7, top_p=0.9, seed=42, stop_at_eos=False)

    # Execute
    with Client(target, api_key=API_KEY, traceparent=TRACEPARENT) as client:
        ack = client.submit(
            [5, 6, 7, 8],
            max_new_tokens=9,
            sampling=sampling,
            priority=-3,
            tenant="acme",
            deadline=deadline,
            idempotency_key="key-1",
        )

    # Assert
    (call,) = fake.calls_of("Submit")
    sent = call.request
    assert isinstance(sent, inference_pb2.SubmitRequest)
    assert list(sent.token_ids.ids) == [5, 6, 7, 8] and not sent.HasField("text")
    assert sent.max_new_tokens == 9
    assert sent.sampling.temperature == pytest.approx(0.7)
    assert sent.sampling.top_p == pytest.approx(0.9)
    assert sent.sampling.seed == 42
    assert sent.sampling.HasField("stop_at_eos") and sent.sampling.stop_at_eos is False
    assert (sent.priority, sent.tenant, sent.idempotency_key) == (-3, "acme", "key-1")
    assert sent.deadline.ToDatetime(tzinfo=UTC) == deadline
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    assert call.metadata["traceparent"] == TRACEPARENT
    assert ack.request_id == "req-001"
    assert ack.request_class is RequestClass.SHORT
    assert (ack.prompt_tokens, ack.deduplicated, ack.idempotency_key) == (4, False, "key-1")


def test_submit_text_with_defaults(fake: FakeControlPlane, target: str) -> None:
    with Client(target) as client:
        ack = client.submit("hello", max_new_tokens=2)

    (call,) = fake.calls_of("Submit")
    sent = call.request
    assert isinstance(sent, inference_pb2.SubmitRequest)
    assert sent.text == "hello" and not sent.HasField("deadline")
    assert not sent.sampling.HasField("stop_at_eos") and sent.sampling.temperature == 0.0
    assert len(ack.idempotency_key) == 32 and sent.idempotency_key == ack.idempotency_key
    assert "authorization" not in call.metadata and "traceparent" not in call.metadata


def test_submit_retry_after_lost_reply_reuses_generated_key(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare: the server makes the request durable, then the reply is lost.
    fake.failures["Submit"] = [Failure(grpc.StatusCode.UNAVAILABLE, "reset", after_effect=True)]

    # Execute
    with Client(target, retry=FAST_RETRY) as client:
        ack = client.submit("hi", max_new_tokens=1)

    # Assert: one request, both attempts carried the same generated key.
    keys = [c.request.idempotency_key for c in fake.calls_of("Submit")]  # type: ignore[attr-defined]
    assert len(keys) == 2 and keys[0] == keys[1] == ack.idempotency_key
    assert ack.deduplicated and list(fake.requests) == [ack.request_id]


def test_retries_unavailable_with_exponential_backoff_then_succeeds(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare
    request_id = fake.add_request()
    fake.failures["Get"] = unavailable(3)
    policy = RetryPolicy(initial_backoff_s=0.05, backoff_multiplier=2.0, jitter=0.5)

    # Execute
    with Client(target, retry=policy, seed=7) as client:
        info = client.get(request_id)

    # Assert: 4 attempts, delays at least (1 - jitter) * 0.05 * 2**k.
    arrivals = [c.at_s for c in fake.calls_of("Get")]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == 4 and info.request_id == request_id
    for k, gap in enumerate(gaps):
        assert gap >= 0.5 * 0.05 * 2**k, gaps


def test_gives_up_after_max_attempts(fake: FakeControlPlane, target: str) -> None:
    fake.failures["Get"] = unavailable(10)

    with Client(target, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(UnavailableError, match="control plane restarting"):
            client.get("req-001")

    assert len(fake.calls_of("Get")) == 3


def test_invalid_argument_is_not_retried_and_names_the_field(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare
    detail = common_pb2.ErrorDetail(code="MAX_NEW_TOKENS_TOO_LARGE", field="max_new_tokens")
    fake.failures["Submit"] = [
        Failure(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens above 4096", detail)
    ]

    # Execute
    with Client(target, retry=FAST_RETRY) as client:
        with pytest.raises(InvalidArgumentError) as raised:
            client.submit("x", max_new_tokens=100_000)

    # Assert
    assert len(fake.calls_of("Submit")) == 1
    error = raised.value
    assert error.field == "max_new_tokens"
    assert error.detail_code == "MAX_NEW_TOKENS_TOO_LARGE"
    assert error.message == "max_new_tokens above 4096" and error.status == "INVALID_ARGUMENT"


def test_invalid_argument_without_detail_has_empty_field(
    fake: FakeControlPlane, target: str
) -> None:
    fake.failures["Get"] = [Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad id")]

    with Client(target) as client, pytest.raises(InvalidArgumentError) as raised:
        client.get("?")

    assert raised.value.field == "" and raised.value.detail_code == ""


def test_resource_exhausted_honors_retry_after_when_configured(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare
    request_id = fake.add_request()
    detail = common_pb2.ErrorDetail(code="QUEUE_FULL", retry_after_s=0.3)
    fake.failures["Get"] = [Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", detail)]
    policy = RetryPolicy(initial_backoff_s=0.01, retry_resource_exhausted=True)

    # Execute
    with Client(target, retry=policy) as client:
        client.get(request_id)

    # Assert
    first, second = (c.at_s for c in fake.calls_of("Get"))
    assert second - first >= 0.3


def test_resource_exhausted_is_raised_with_retry_after_by_default(
    fake: FakeControlPlane, target: str
) -> None:
    detail = common_pb2.ErrorDetail(code="QUEUE_FULL", retry_after_s=2.5)
    fake.failures["Get"] = [Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", detail)]

    with Client(target, retry=FAST_RETRY) as client, pytest.raises(ResourceExhaustedError) as r:
        client.get("req-001")

    assert r.value.retry_after_s == 2.5 and len(fake.calls_of("Get")) == 1


def test_unknown_api_key_raises_unauthenticated_without_retry(
    fake: FakeControlPlane, target: str
) -> None:
    fake.api_key = API_KEY

    with Client(target, api_key="wrong", retry=FAST_RETRY) as client:
        with pytest.raises(UnauthenticatedError):
            client.get("req-001")
    with Client(target, retry=FAST_RETRY) as client:
        with pytest.raises(UnauthenticatedError):
            client.submit("x", max_new_tokens=1)

    assert [c.metadata.get("authorization") for c in fake.calls] == ["Bearer wrong", None]


def test_traceparent_callable_is_read_on_every_call(fake: FakeControlPlane, target: str) -> None:
    request_id = fake.add_request()
    parents = iter([TRACEPARENT, None, TRACEPARENT.replace("01", "00")])

    with Client(target, traceparent=lambda: next(parents)) as client:
        for _ in range(3):
            client.get(request_id)

    sent = [c.metadata.get("traceparent") for c in fake.calls_of("Get")]
    assert sent == [TRACEPARENT, None, TRACEPARENT.replace("01", "00")]


def test_deadline_is_honored(fake: FakeControlPlane, target: str) -> None:
    fake.delay_s["Get"] = 2.0

    start = time.monotonic()
    with Client(target) as client, pytest.raises(DeadlineExceededError):
        client.get("req-001", timeout_s=0.3)

    assert time.monotonic() - start < 1.5


def test_deadline_bounds_retries(fake: FakeControlPlane, target: str) -> None:
    fake.failures["Get"] = unavailable(100)
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.1, jitter=0.0)

    start = time.monotonic()
    with Client(target, retry=policy, timeout_s=0.45) as client:
        with pytest.raises(UnavailableError):
            client.get("req-001")

    assert time.monotonic() - start < 0.9
    assert 3 <= len(fake.calls_of("Get")) <= 5


def test_get_and_cancel_convert_the_request(fake: FakeControlPlane, target: str) -> None:
    request_id = fake.add_request(prompt_tokens=7, preemptions=2, instance_ids=["i0", "i1"])

    with Client(target) as client:
        info = client.get(request_id)
        cancelled = client.cancel(request_id)
        with pytest.raises(NotFoundError):
            client.get("req-999")

    assert info.state is RequestState.QUEUED and info.prompt_tokens == 7
    assert info.preemptions == 2 and info.instance_ids == ("i0", "i1")
    assert info.timestamps.arrival == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert info.timestamps.finished is None and info.deadline is None
    assert cancelled.state is RequestState.CANCELLED and cancelled.state.is_terminal
    assert cancelled.timestamps.finished is not None


def test_generate_resumes_after_unavailable_without_duplicates(
    fake: FakeControlPlane, target: str
) -> None:
    # Prepare: 11 tokens in chunks of 2; the first stream dies after 2 chunks, the next after 1.
    request_id = fake.add_request(prompt_tokens=3, max_new_tokens=11)
    fake.drop_after_chunks = [2, 1]

    # Execute
    with Client(target, retry=FAST_RETRY) as client:
        chunks = list(client.generate(request_id))

    # Assert
    expected = output_tokens(3, 11)
    from_indices = [c.request.from_token_index for c in fake.calls_of("Generate")]  # type: ignore[attr-defined]
    assert from_indices == [0, 4, 6]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert [c.start_index for c in chunks] == list(range(0, 11, 2))
    assert "".join(c.text for c in chunks) == token_text(expected)
    assert chunks[-1].final_state is RequestState.FINISHED
    assert all(c.final_state is None for c in chunks[:-1])


def test_generate_drops_tokens_a_sloppy_server_resends(fake: FakeControlPlane, target: str) -> None:
    # Prepare: the server restarts from 0 on every stream; chunks of 3 overlap the cursor.
    request_id = fake.add_request(prompt_tokens=1, max_new_tokens=10)
    fake.ignore_from_index = True
    fake.chunk_size = 3
    fake.drop_after_chunks = [1, 2]

    # Execute
    with Client(target, retry=FAST_RETRY) as client:
        result = client.result(request_id)

    # Assert
    assert result.token_ids == tuple(output_tokens(1, 10))
    assert result.state is RequestState.FINISHED
    assert len(fake.calls_of("Generate")) == 3


def test_generate_resumes_after_stream_closed_before_final_chunk(
    fake: FakeControlPlane, target: str
) -> None:
    request_id = fake.add_request(prompt_tokens=2, max_new_tokens=6)
    fake.drop_after_chunks = [1]
    fake.drop_with_clean_close = True

    with Client(target, retry=FAST_RETRY) as client:
        result = client.result(request_id)

    assert result.token_ids == tuple(output_tokens(2, 6))
    assert result.text == token_text(output_tokens(2, 6))


def test_generate_from_index_skips_the_head(fake: FakeControlPlane, target: str) -> None:
    request_id = fake.add_request(prompt_tokens=2, max_new_tokens=6)

    with Client(target) as client:
        chunks = list(client.generate(request_id, from_token_index=4))

    assert [t for c in chunks for t in c.token_ids] == output_tokens(2, 6)[4:]
    assert chunks[0].start_index == 4


def test_generate_raises_protocol_error_when_server_skips_tokens(
    fake: FakeControlPlane, target: str
) -> None:
    request_id = fake.add_request(prompt_tokens=2, max_new_tokens=6)
    fake.skip_tokens = 1

    with Client(target) as client, pytest.raises(ProtocolError, match="jumped from index 0 to 1"):
        list(client.generate(request_id))


def test_list_requests_iterates_every_page(fake: FakeControlPlane, target: str) -> None:
    # Prepare
    ids = [fake.add_request() for _ in range(7)]

    # Execute
    with Client(target) as client:
        everything = list(client.list_requests(page_size=3))
        first_five = list(client.list_requests(page_size=3, limit=5))

    # Assert
    assert [i.request_id for i in everything] == ids[::-1]
    assert [i.request_id for i in first_five] == ids[::-1][:5]
    tokens = [c.request.page_token for c in fake.calls_of("List")]  # type: ignore[attr-defined]
    assert tokens == ["", "3", "6", "", "3"]


def test_list_sends_filters(fake: FakeControlPlane, target: str) -> None:
    fake.add_request(tenant="a")
    wanted = fake.add_request(tenant="b")

    with Client(target) as client:
        page = client.list_page(
            states=[RequestState.QUEUED, RequestState.DECODING],
            request_class=RequestClass.SHORT,
            tenant="b",
            page_size=10,
        )

    sent = fake.calls_of("List")[0].request
    assert isinstance(sent, inference_pb2.ListRequest)
    assert list(sent.states) == [common_pb2.REQUEST_STATE_QUEUED, common_pb2.REQUEST_STATE_DECODING]
    assert sent.request_class == common_pb2.REQUEST_CLASS_SHORT and sent.page_size == 10
    assert [r.request_id for r in page.requests] == [wanted] and page.next_page_token == ""


def test_watch_yields_snapshots(fake: FakeControlPlane, target: str) -> None:
    with Client(target) as client:
        stream = client.watch(interval_s=0.01)
        snapshots = [next(stream) for _ in range(3)]
        stream.close()

    assert [s.num_preemptions_total for s in snapshots] == [0, 1, 2]
    first = snapshots[0]
    assert first.policy == "pecsched" and first.throughput_rps == 1.5
    assert [c.request_class for c in first.classes] == [RequestClass.SHORT, RequestClass.LONG]
    assert first.classes[0].num_queued == 4 and first.classes[0].num_queued_tokens == 512
    assert first.instances[0].request_ids == ("req-long",)
    assert first.instances[1].role.value == "short_decode"
    assert first.at == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert fake.calls_of("Watch")[0].request.interval_s == 0.01  # type: ignore[attr-defined]


def test_watch_reconnects_after_unavailable(fake: FakeControlPlane, target: str) -> None:
    fake.failures["Watch"] = unavailable(2)

    with Client(target, retry=FAST_RETRY) as client:
        stream = client.watch(interval_s=0.01)
        snapshot = next(stream)
        stream.close()

    assert snapshot.policy == "pecsched" and len(fake.calls_of("Watch")) == 3


def test_bad_client_input_names_the_field(target: str) -> None:
    with Client(target) as client:
        with pytest.raises(ValueError, match="max_new_tokens"):
            client.submit("x", max_new_tokens=0)
        with pytest.raises(ValueError, match=r"prompt\[1\]"):
            client.submit([1, -2], max_new_tokens=1)
        with pytest.raises(ValueError, match="deadline"):
            client.submit("x", max_new_tokens=1, deadline=datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="top_p"):
            Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="traceparent"):
        Client(target, traceparent="not-a-traceparent")


def test_tls_with_root_certificates(fake: FakeControlPlane, tls_target: tuple[str, bytes]) -> None:
    # Prepare
    address, cert_pem = tls_target
    request_id = fake.add_request()

    # Execute
    with Client(address, root_certificates=cert_pem) as client:
        info = client.get(request_id)
    with Client(address, retry=RetryPolicy(max_attempts=1), timeout_s=2) as plaintext:
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            plaintext.get(request_id)

    # Assert
    assert info.request_id == request_id


def test_generate_survives_a_control_plane_restart(fake: FakeControlPlane) -> None:
    # Prepare: a slow stream; after 3 chunks the server goes away and comes back 1 s later
    # on the same port (same state, as a restarted control plane recovers it from its DB).

    def start(address: str) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        inference_pb2_grpc.add_InferenceServicer_to_server(fake, server)
        port = server.add_insecure_port(address)
        server.start()
        return server, port

    request_id = fake.add_request(prompt_tokens=2, max_new_tokens=12)
    fake.chunk_size, fake.chunk_interval_s = 1, 0.05
    first, port = start("127.0.0.1:0")
    servers = [first]

    def restart() -> None:
        wait_until(lambda: fake.num_chunks_sent >= 3, "3 chunks streamed", poll_s=0.005)
        first.stop(grace=None)
        time.sleep(1.0)  # the outage itself (the scenario, not a wait): the client retries
        servers.append(start(f"127.0.0.1:{port}")[0])

    restarter = threading.Thread(target=restart)
    restarter.start()

    # Execute
    try:
        with Client(f"127.0.0.1:{port}", seed=1) as client:
            result = client.result(request_id, timeout_s=20)
    finally:
        restarter.join()
        for server in servers:
            server.stop(grace=None)

    # Assert
    from_indices = [c.request.from_token_index for c in fake.calls_of("Generate")]  # type: ignore[attr-defined]
    assert result.token_ids == tuple(output_tokens(2, 12))
    assert result.state is RequestState.FINISHED
    assert from_indices[0] == 0 and from_indices[-1] >= 3 and len(from_indices) == 2
