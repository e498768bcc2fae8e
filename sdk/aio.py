"""asyncio client of the control plane's Inference API: `sdk.client.Client`'s methods, awaitable.

    async with AsyncClient("127.0.0.1:50051", api_key="k") as client:
        ack = await client.submit("Hello", max_new_tokens=16)
        async for chunk in client.generate(ack.request_id):
            print(chunk.text, end="")

Deadlines, retries, stream resumption and errors behave exactly as in the sync client; the shared
logic lives in `sdk/convert.py`, `sdk/retry.py`, `sdk/stream.py` and `sdk/rpc.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

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


class AsyncClient:
    """An asyncio client; one grpc.aio channel, used from one event loop."""

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
        """Open a channel to `target`; the arguments are those of `sdk.client.Client`."""
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
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._methods = inference_pb2_grpc.InferenceStub(self._channel)
        self._owns_channel = True

    def with_api_key(self, api_key: str | None) -> AsyncClient:
        """A client that sends `api_key` instead, over this client's channel (no new connection).

        For front ends that forward each caller's key (the OpenAI gateway). Closing the derived
        client does nothing; closing this one ends the calls of both.
        """
        derived = object.__new__(AsyncClient)
        derived._settings = dataclasses.replace(self._settings, api_key=api_key)
        derived._rng = derived._settings.make_rng()
        derived._channel = self._channel
        derived._methods = self._methods
        derived._owns_channel = False
        return derived

    async def close(self) -> None:
        """Close the channel (a client from `with_api_key` leaves it open); calls in flight are
        cancelled."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _budget(self, label: str, timeout_s: float | None, use_default: bool) -> CallBudget:
        effective_s = self._settings.timeout_s if use_default and timeout_s is None else timeout_s
        return CallBudget(self._settings.retry, effective_s, self._rng, label)

    async def _unary(
        self, method: Callable[..., Awaitable[_T]], request: Any, timeout_s: float | None
    ) -> _T:
        budget = self._budget(type(request).__name__.removesuffix("Request"), timeout_s, True)
        while True:
            try:
                return await method(
                    request,
                    metadata=call_metadata(self._settings),
                    timeout=budget.attempt_timeout_s(),
                )
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay_s = budget.next_delay_s(error)
                if delay_s is None:
                    raise error from exc
            await asyncio.sleep(delay_s)

    async def _resuming_stream(
        self,
        label: str,
        method: Any,
        make_request: Callable[[], Any],
        on_message: Callable[[Any], Iterable[_T]],
        is_done: Callable[[], bool],
        ended_early: Callable[[], PecSchedError] | None,
        timeout_s: float | None,
    ) -> AsyncGenerator[_T, None]:
        # The asyncio twin of Client._resuming_stream (same contract).
        budget = self._budget(label, timeout_s, use_default=False)
        while True:
            call = method(
                make_request(),
                metadata=call_metadata(self._settings),
                timeout=budget.attempt_timeout_s(),
            )
            try:
                async for message in call:
                    budget.record_progress()
                    for item in on_message(message):
                        yield item
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
            await asyncio.sleep(delay_s)

    # -- API --------------------------------------------------------------------------------

    async def submit(
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
        """Submit a request; see `sdk.client.Client.submit`."""
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
        response: inference_pb2.SubmitResponse = await self._unary(
            self._methods.Submit, request, timeout_s
        )
        return convert.submit_result_from_proto(response, key)

    def generate(
        self, request_id: str, *, from_token_index: int = 0, timeout_s: float | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """The request's output tokens, resumed transparently; see `Client.generate`."""
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

    async def result(self, request_id: str, *, timeout_s: float | None = None) -> GenerateResult:
        """Wait for the request to end and return its whole output."""
        collector = ResultCollector(request_id)
        async for chunk in self.generate(request_id, timeout_s=timeout_s):
            collector.add(chunk)
        return collector.result()

    async def get(self, request_id: str, *, timeout_s: float | None = None) -> RequestInfo:
        """The request's state, class, timestamps, preemptions and instances."""
        response: inference_pb2.Request = await self._unary(
            self._methods.Get, inference_pb2.GetRequest(request_id=request_id), timeout_s
        )
        return convert.request_info_from_proto(response)

    async def cancel(self, request_id: str, *, timeout_s: float | None = None) -> RequestInfo:
        """Cancel the request (a no-op when it already ended); returns its state after."""
        response: inference_pb2.Request = await self._unary(
            self._methods.Cancel, inference_pb2.CancelRequest(request_id=request_id), timeout_s
        )
        return convert.request_info_from_proto(response)

    async def list_page(
        self,
        *,
        states: Iterable[RequestState] = (),
        request_class: RequestClass | None = None,
        tenant: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> ListPage:
        """One page of requests matching the filters, newest first."""
        request = convert.list_to_proto(
            states=states,
            request_class=request_class,
            tenant=tenant,
            page_size=page_size,
            page_token=page_token,
        )
        response: inference_pb2.ListResponse = await self._unary(
            self._methods.List, request, timeout_s
        )
        return convert.list_page_from_proto(response)

    async def list_requests(
        self,
        *,
        states: Iterable[RequestState] = (),
        request_class: RequestClass | None = None,
        tenant: str = "",
        page_size: int = 0,
        limit: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[RequestInfo, None]:
        """Every request matching the filters, newest first, fetching pages as needed.

        At most `limit` (the `limit` newest). Pages are keyset-paged by the server: each request
        stored when the first page was read (and still matching) comes exactly once, and
        requests submitted while iterating (newer than what was read) are left for the next
        listing.
        """
        wanted_states = tuple(states)
        num_yielded, token = 0, ""
        while limit is None or num_yielded < limit:
            page = await self.list_page(
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
    ) -> AsyncGenerator[ClusterSnapshot, None]:
        """Cluster snapshots every `interval_s`, reconnecting after UNAVAILABLE."""
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
