"""Synchronous client of the control plane's Inference API.

    with Client("127.0.0.1:50051", api_key="k") as client:
        ack = client.submit("Hello", max_new_tokens=16)
        for chunk in client.generate(ack.request_id):
            print(chunk.text, end="")

Every call has a deadline (`timeout_s`, default from the client; it covers retries and stream
resumptions), retries UNAVAILABLE with exponential backoff and jitter (see `sdk/retry.py`), and
raises the typed errors of `sdk/errors.py`. `sdk/aio.py` is the asyncio twin with the same
methods.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc

from protos.pecsched.v1 import inference_pb2, inference_pb2_grpc
from sdk import convert
from sdk.errors import PecSchedError
from sdk.retry import CallBudget, RetryPolicy
from sdk.rpc import (
    ClientSettings,
    TraceparentSource,
    call_metadata,
    channel_credentials,
    error_from_rpc,
)
from sdk.stream import ResultCollector, TokenCursor
from sdk.types import (
    ClusterSnapshot,
    GenerateResult,
    ListPage,
    Prompt,
    RequestClass,
    RequestInfo,
    RequestState,
    Sampling,
    SubmitResult,
    TokenChunk,
)

_T = TypeVar("_T")


class Client:
    """A blocking client; one gRPC channel, safe to share between threads."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        traceparent: TraceparentSource = None,
        timeout_s: float | None = 30.0,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        seed: int | None = None,
    ) -> None:
        """Open a channel to `target` ("host:port").

        Args:
            target: the control plane's gRPC address.
            api_key: sent as `authorization: Bearer <key>` on every call.
            tls: encrypt the channel, verifying the server against the system roots.
            root_certificates: PEM roots to verify the server with (implies TLS).
            traceparent: a W3C traceparent sent as `traceparent` metadata, or a callable that
                returns the current one (or None) before every call.
            timeout_s: default deadline of unary calls, retries included (None: no deadline).
            retry: retry policy (default `RetryPolicy()`).
            channel_options: extra grpc channel arguments.
            seed: seeds the backoff jitter, for reproducible timing in tests.
        """
        self._settings = ClientSettings(
            target=target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            traceparent=traceparent,
            timeout_s=timeout_s,
            retry=retry if retry is not None else RetryPolicy(),
            channel_options=tuple(channel_options),
            seed=seed,
        )
        self._rng = self._settings.make_rng()
        credentials = channel_credentials(self._settings)
        options = self._settings.grpc_options()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._methods = inference_pb2_grpc.InferenceStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _budget(self, label: str, timeout_s: float | None, use_default: bool) -> CallBudget:
        effective_s = self._settings.timeout_s if use_default and timeout_s is None else timeout_s
        return CallBudget(self._settings.retry, effective_s, self._rng, label)

    def _unary(self, method: Callable[..., _T], request: Any, timeout_s: float | None) -> _T:
        budget = self._budget(type(request).__name__.removesuffix("Request"), timeout_s, True)
        while True:
            try:
                return method(
                    request,
                    metadata=call_metadata(self._settings),
                    timeout=budget.attempt_timeout_s(),
                )
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay_s = budget.next_delay_s(error)
                if delay_s is None:
                    raise error from exc
            time.sleep(delay_s)

    def _resuming_stream(
        self,
        label: str,
        method: Any,
        make_request: Callable[[], Any],
        on_message: Callable[[Any], Iterable[_T]],
        is_done: Callable[[], bool],
        ended_early: Callable[[], PecSchedError] | None,
        timeout_s: float | None,
    ) -> Generator[_T, None, None]:
        # Opens the stream, re-opens it (with a fresh request) after a retryable failure, and
        # stops when `is_done()`; `ended_early` None means a clean close is a normal end.
        budget = self._budget(label, timeout_s, use_default=False)
        while True:
            call = method(
                make_request(),
                metadata=call_metadata(self._settings),
                timeout=budget.attempt_timeout_s(),
            )
            try:
                for message in call:
                    budget.record_progress()
                    yield from on_message(message)
                    if is_done():
                        return
                if ended_early is None:
                    return
                error = ended_early()
                cause: BaseException | None = None
            except grpc.RpcError as exc:
                error, cause = error_from_rpc(exc), exc
            finally:
                call.cancel()
            delay_s = budget.next_delay_s(error)
            if delay_s is None:
                raise error from cause
            time.sleep(delay_s)

    # -- API --------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int,
        sampling: Sampling | None = None,
        priority: int = 0,
        tenant: str = "",
        deadline: datetime | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> SubmitResult:
        """Submit a request (text, chat messages or token ids); returns once it is durable.

        An idempotency key is generated when none is given, so the client's own retries never
        create a second request. `deadline` (aware datetime) is when the server gives up on it.
        Raises InvalidArgumentError (`.field` set), UnauthenticatedError, ResourceExhaustedError…
        """
        key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
        request = convert.submit_to_proto(
            prompt,
            max_new_tokens=max_new_tokens,
            sampling=sampling if sampling is not None else Sampling(),
            priority=priority,
            tenant=tenant,
            deadline=deadline,
            idempotency_key=key,
        )
        response: inference_pb2.SubmitResponse = self._unary(
            self._methods.Submit, request, timeout_s
        )
        return convert.submit_result_from_proto(response, key)

    def generate(
        self, request_id: str, *, from_token_index: int = 0, timeout_s: float | None = None
    ) -> Generator[TokenChunk, None, None]:
        """The request's output tokens from `from_token_index`, until its final chunk.

        A dropped stream is resumed transparently from the last received token; each token is
        yielded exactly once. `timeout_s` (default: none) bounds the whole stream.
        """
        cursor = TokenCursor(request_id, from_token_index)

        def on_message(message: inference_pb2.TokenChunk) -> Iterable[TokenChunk]:
            chunk = cursor.accept(message)
            return () if chunk is None else (chunk,)

        return self._resuming_stream(
            "Generate",
            self._methods.Generate,
            cursor.generate_request,
            on_message,
            lambda: cursor.final_state is not None,
            cursor.ended_early,
            timeout_s,
        )

    def result(self, request_id: str, *, timeout_s: float | None = None) -> GenerateResult:
        """Wait for the request to end and return its whole output (via `generate`)."""
        collector = ResultCollector(request_id)
        for chunk in self.generate(request_id, timeout_s=timeout_s):
            collector.add(chunk)
        return collector.result()

    def get(self, request_id: str, *, timeout_s: float | None = None) -> RequestInfo:
        """The request's state, class, timestamps, preemptions and instances."""
        response: inference_pb2.Request = self._unary(
            self._methods.Get, inference_pb2.GetRequest(request_id=request_id), timeout_s
        )
        return convert.request_info_from_proto(response)

    def cancel(self, request_id: str, *, timeout_s: float | None = None) -> RequestInfo:
        """Cancel the request (a no-op when it already ended); returns its state after."""
        response: inference_pb2.Request = self._unary(
            self._methods.Cancel, inference_pb2.CancelRequest(request_id=request_id), timeout_s
        )
        return convert.request_info_from_proto(response)

    def list_page(
        self,
        *,
        states: Iterable[RequestState] = (),
        request_class: RequestClass | None = None,
        tenant: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> ListPage:
        """One page of requests matching the filters, newest first (page_size 0: server's)."""
        request = convert.list_to_proto(
            states=states,
            request_class=request_class,
            tenant=tenant,
            page_size=page_size,
            page_token=page_token,
        )
        response: inference_pb2.ListResponse = self._unary(self._methods.List, request, timeout_s)
        return convert.list_page_from_proto(response)

    def list_requests(
        self,
        *,
        states: Iterable[RequestState] = (),
        request_class: RequestClass | None = None,
        tenant: str = "",
        page_size: int = 0,
        limit: int | None = None,
        timeout_s: float | None = None,
    ) -> Generator[RequestInfo, None, None]:
        """Every request matching the filters, newest first, fetching pages as needed.

        At most `limit` (the `limit` newest). Pages are keyset-paged by the server: each request
        stored when the first page was read (and still matching) comes exactly once, and
        requests submitted while iterating (newer than what was read) are left for the next
        listing.
        """
        wanted_states = tuple(states)
        num_yielded, token = 0, ""
        while limit is None or num_yielded < limit:
            page = self.list_page(
                states=wanted_states,
                request_class=request_class,
                tenant=tenant,
                page_size=page_size,
                page_token=token,
                timeout_s=timeout_s,
            )
            for info in page.requests[: None if limit is None else limit - num_yielded]:
                num_yielded += 1
                yield info
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch(
        self, *, interval_s: float = 1.0, timeout_s: float | None = None
    ) -> Generator[ClusterSnapshot, None, None]:
        """Cluster snapshots every `interval_s`, reconnecting after UNAVAILABLE, until closed."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")

        def on_message(message: inference_pb2.ClusterSnapshot) -> Iterable[ClusterSnapshot]:
            return (convert.snapshot_from_proto(message),)

        return self._resuming_stream(
            "Watch",
            self._methods.Watch,
            lambda: inference_pb2.WatchRequest(interval_s=interval_s),
            on_message,
            lambda: False,
            None,
            timeout_s,
        )
