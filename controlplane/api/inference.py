"""`pecsched.v1.Inference` servicer: Submit, Generate, Get, Cancel, List, Watch.

Each method follows the recipe of controlplane/api/recipe.py. Tenancy: client keys see and
cancel only their tenant's requests; another tenant's request is NOT_FOUND, exactly like a
missing one (no message names an id's owner); Watch needs an admin key.
Generate serves the committed tokens of a request from `from_token_index` on: from the
runtime's live log while the request runs, from the store once it is finished; the last chunk
carries the final state.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from controlplane.api import convert
from controlplane.api.auth import current_principal, may_see, require_admin, require_tenant
from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.api.recipe import Traced, rpc
from controlplane.api.validate import new_request_from_proto, new_request_id
from controlplane.config import Config
from controlplane.core.types import RequestView
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.runtime.inputs import PendingSubmit
from controlplane.runtime.loop import Runtime
from controlplane.runtime.tokens import TokenLog
from controlplane.store import codec
from controlplane.store.errors import NotFound
from controlplane.store.records import ListOrder, RequestFilter
from controlplane.telemetry import (
    ATTR_DEDUPLICATED,
    ATTR_PROMPT_TOKENS,
    ATTR_REQUEST_CLASS,
    ATTR_REQUEST_ID,
    ATTR_TENANT,
    SPAN_RPC,
    SPAN_SUBMIT,
    Span,
    Telemetry,
)
from controlplane.text.codec import StreamDecoder, TextCodec
from protos.pecsched.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_PAGE_SIZE = 100


class InferenceServicer(inference_pb2_grpc.InferenceServicer, Traced):
    """Client-facing API over the runtime."""

    def __init__(
        self,
        runtime: Runtime,
        config: Config,
        telemetry: Telemetry,
        text_codec: TextCodec | None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.telemetry = telemetry
        self.text_codec = text_codec  # tokenizes text/chat prompts, decodes output; None: ids only

    @rpc(SPAN_SUBMIT)
    async def Submit(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.SubmitRequest, context: Any, span: Span
    ) -> inference_pb2.SubmitResponse:
        """Validate, persist (group commit) and acknowledge a request."""
        principal = current_principal()
        validate = functools.partial(
            new_request_from_proto,
            request,
            principal,
            self.config,
            self.runtime.clock.now_s(),
            new_request_id(),
            self.text_codec,
            self._vocab_size(),
        )
        # Tokenizing a long text or chat prompt takes seconds: in a thread (the tokenizer
        # releases the GIL), so the scheduler and the other calls keep running meanwhile.
        is_text = request.WhichOneof("prompt") in ("text", "chat")
        new = await asyncio.to_thread(validate) if is_text else validate()
        span.set_attribute(ATTR_TENANT, new.spec.tenant)
        span.set_attribute(ATTR_PROMPT_TOKENS, new.spec.prompt_tokens)
        outcome = await self.runtime.submit(PendingSubmit(new, span.context))
        if outcome.key_reused:
            raise RuntimeServiceError(
                RuntimeErrorCode.KEY_REUSED, "idempotency key reused", field="idempotency_key"
            )
        if outcome.view is None:
            raise RuntimeServiceError(
                RuntimeErrorCode.PROMPT_TOO_LONG, f"prompt: {outcome.refusal}", field="prompt"
            )
        view = outcome.view
        span.set_attribute(ATTR_REQUEST_ID, view.request_id)
        span.set_attribute(ATTR_REQUEST_CLASS, view.request_class.value)
        span.set_attribute(ATTR_DEDUPLICATED, not outcome.created)
        return inference_pb2.SubmitResponse(
            request_id=view.request_id,
            request_class=convert.request_class_to_proto(view.request_class),
            prompt_tokens=view.spec.prompt_tokens,
            deduplicated=not outcome.created,
        )

    def _vocab_size(self) -> int | None:
        """Token ids must be below this: the smaller of the configured vocabulary size and
        the one the served model's agents reported (None while neither is known)."""
        known = [v for v in (self.config.vocab_size, self.runtime.agents.vocab_size) if v]
        return min(known) if known else None

    @rpc(SPAN_RPC)
    async def Generate(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GenerateRequest, context: Any, span: Span
    ) -> AsyncIterator[inference_pb2.TokenChunk]:
        """Stream committed tokens from `from_token_index` until the request ends."""
        rid = request.request_id
        await self.runtime.until_serving()  # token logs exist once recovery has run
        await self._owned(rid)
        span.set_attribute(ATTR_REQUEST_ID, rid)
        index = request.from_token_index
        while True:  # one pass per token log: a rebuilt runtime replaces the logs
            log = self.runtime.token_log(rid)
            if log is None:
                view = await self.runtime.get(rid)
                log = self.runtime.token_log(rid)
                if log is None:  # finished (terminal views are final in the store)
                    output = await self.runtime.read_tokens(rid, 0)
                    decoder = self._decoder(output[:index])
                    tokens = output[index:]
                    text = decoder.feed(tokens, final=True) if decoder else ""
                    final = view.state if view.state.is_terminal else None
                    yield convert.token_chunk_to_proto(rid, index, tokens, text, final, view.error)
                    return
            decoder = self._decoder(log.ids[:index])  # what was streamed fixes its state
            async for chunk in self._follow(rid, log, index, decoder):
                index = chunk.start_index + len(chunk.token_ids)
                yield chunk
            if log.final_state is not None:
                return

    async def _follow(
        self, rid: str, log: TokenLog, index: int, decoder: StreamDecoder | None
    ) -> AsyncIterator[inference_pb2.TokenChunk]:
        """Chunks of `log`'s committed tokens from `index` until it is final or retired."""
        stopped = asyncio.ensure_future(self.runtime.stopped.wait())
        try:
            while True:
                changed = log.changed()
                end = log.committed
                final = log.final_state
                if index < end or final is not None:
                    ids = log.ids[index:end] if index < end else []
                    text = decoder.feed(ids, final=final is not None) if decoder else ""
                    yield convert.token_chunk_to_proto(rid, index, ids, text, final, log.error)
                    index = max(index, end)
                    if final is not None:
                        return
                if log.retired:
                    return
                waiter = asyncio.ensure_future(changed.wait())
                await asyncio.wait((waiter, stopped), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if stopped.done() and log.final_state is None:
                    raise RuntimeServiceError(
                        RuntimeErrorCode.SHUTTING_DOWN, "the control plane is shutting down"
                    )
        finally:
            stopped.cancel()

    @rpc(SPAN_RPC)
    async def Get(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GetRequest, context: Any, span: Span
    ) -> inference_pb2.Request:
        """One request's committed state."""
        span.set_attribute(ATTR_REQUEST_ID, request.request_id)
        return convert.request_to_proto(await self._owned(request.request_id))

    @rpc(SPAN_RPC)
    async def Cancel(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.CancelRequest, context: Any, span: Span
    ) -> inference_pb2.Request:
        """Cancel a request (a no-op once it is finished)."""
        span.set_attribute(ATTR_REQUEST_ID, request.request_id)
        view = await self._owned(request.request_id)
        if not view.state.is_terminal:
            who = "admin" if current_principal().is_admin else "client"
            view = await self.runtime.cancel(request.request_id, f"cancelled by {who}")
        return convert.request_to_proto(view)

    @rpc(SPAN_RPC)
    async def List(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.ListRequest, context: Any, span: Span
    ) -> inference_pb2.ListResponse:
        """A page of requests matching the filters, newest first (client keys: own tenant only)."""
        principal = current_principal()
        request_filter = convert.list_filter_from_proto(request)
        if request_filter.tenant is None and not principal.is_admin:
            request_filter = RequestFilter(
                request_filter.states, request_filter.request_class, principal.tenant
            )
        require_tenant(principal, request_filter.tenant or principal.tenant)
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, codec.MAX_PAGE_SIZE)
        try:
            page = await self.runtime.list_requests(
                request_filter, page_size, request.page_token, ListOrder.NEWEST_FIRST
            )
        except ValueError as exc:
            # The store's message already names the field: "page_token: ...".
            raise ApiError(ApiErrorCode.BAD_PAGE_TOKEN, str(exc), field="page_token") from exc
        return inference_pb2.ListResponse(
            requests=[convert.request_to_proto(v) for v in page.views],
            next_page_token=page.next_page_token,
        )

    @rpc(SPAN_RPC)
    async def Watch(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.WatchRequest, context: Any, span: Span
    ) -> AsyncIterator[inference_pb2.ClusterSnapshot]:
        """Cluster snapshots every `interval_s` (admin keys only)."""
        require_admin(current_principal(), "Watch")
        interval_s = request.interval_s if request.interval_s > 0 else 1.0
        if interval_s < 0.05:
            raise ApiError(
                ApiErrorCode.INVALID_ARGUMENT, "interval_s: at least 0.05", field="interval_s"
            )
        while True:
            view = await self.runtime.cluster_view()
            yield convert.cluster_to_proto(view, self.runtime.throughput_rps())
            await asyncio.sleep(interval_s)

    def _decoder(self, streamed_ids: Sequence[int]) -> StreamDecoder | None:
        """A text decoder positioned after the output tokens already streamed (None: no text)."""
        return self.text_codec.stream_decoder(streamed_ids) if self.text_codec else None

    async def _owned(self, request_id: str) -> RequestView:
        """The request's view if the caller may see it (NOT_FOUND otherwise, also for another
        tenant's request)."""
        if not request_id:
            raise ApiError(
                ApiErrorCode.INVALID_ARGUMENT, "request_id: must not be empty", field="request_id"
            )
        try:
            view = await self.runtime.get(request_id)
        except NotFound as exc:
            raise ApiError(ApiErrorCode.NOT_FOUND, "no such request", field="request_id") from exc
        if not may_see(current_principal(), view.spec.tenant):
            raise ApiError(ApiErrorCode.NOT_FOUND, "no such request", field="request_id")
        return view
