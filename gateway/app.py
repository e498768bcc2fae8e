"""The Starlette application: routes, bearer keys, streaming, disconnects.

Each request: parse and validate the body (400 naming the parameter), check the model name (404
`model_not_found`), take the caller's bearer token as its API key (the control plane maps keys to
tenants and refuses unknown ones: 401), submit through the SDK (control-plane refusals keep their
meaning: 400, 401, 403, 429 with Retry-After, 503), then answer with the whole completion or
stream it as server-sent events ending in `data: [DONE]`. A caller that disconnects has its
request cancelled on the cluster, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.errors import OpenAIError, from_sdk_error, invalid_request
from gateway.generation import Generation, GenerationFailed, Outcome
from gateway.responses import Shape, sse
from gateway.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from sdk.aio import AsyncClient
from sdk.errors import PecSchedError
from sdk.types import ChatMessage, Prompt, Sampling

_log = logging.getLogger("gateway")

CLIENT_CLOSED_REQUEST = 499  # the caller went away before the answer (nginx's convention)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """What the gateway serves and how."""

    target: str  # the control plane's gRPC address, host:port
    listen: str = "127.0.0.1:8000"  # HTTP address, host:port
    model_name: str = "pecsched"  # the model id /v1/models lists and requests must name
    default_max_tokens: int = 256  # when a request sets neither max_tokens nor its chat twin

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ValueError(f"listen: must be HOST:PORT, got {self.listen!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens: must be >= 1, got {self.default_max_tokens}")


class OpenAIApi:
    """The endpoints, over one SDK client (one channel; each caller's key per request)."""

    def __init__(self, client: AsyncClient, settings: GatewaySettings) -> None:
        self.client = client
        self.settings = settings
        self.created_s = int(time.time())

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the one served model."""
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model}."""
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        body = parse_body(CompletionRequest, await _json(request))
        return await self._serve(request, body, body.prompt_value, is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        body = parse_body(ChatCompletionRequest, await _json(request))
        messages = [ChatMessage(m.role, m.text) for m in body.messages]
        return await self._serve(request, body, messages, is_chat=True)

    # -- plumbing ---------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created_s,
            "owned_by": "pecsched",
        }

    def _check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise OpenAIError(
                404,
                f"The model `{name}` does not exist (this server serves "
                f"`{self.settings.model_name}`)",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    async def _serve(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        prompt: Prompt,
        *,
        is_chat: bool,
    ) -> Response:
        self._check_model(body.model)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=seed)
        max_tokens = body.max_tokens_asked or self.settings.default_max_tokens
        client = self.client.with_api_key(_bearer_key(request))
        try:
            generation = await Generation.start(client, prompt, max_tokens, sampling)
        except PecSchedError as exc:
            raise from_sdk_error(exc) from exc
        except ValueError as exc:  # the SDK's own checks (e.g. token ids out of range)
            raise invalid_request(str(exc), "prompt") from exc
        prefix = "chatcmpl-" if is_chat else "cmpl-"
        shape = Shape(is_chat, prefix + generation.request_id, int(time.time()), body.model)
        events = generation.events(body.stop_sequences)
        if body.stream:
            return StreamingResponse(
                _sse_stream(events, shape, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collected = await _collect_unless_gone(request, events)
        if collected is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        text, outcome = collected
        return JSONResponse(shape.whole(text, outcome))


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}", None) from exc


def _bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip() or any(c.isspace() for c in key.strip()):
        raise OpenAIError(
            401, "expected `Authorization: Bearer <key>`", "authentication_error", None, None
        )
    return key.strip()


async def _sse_stream(
    events: AsyncIterator[str | Outcome], shape: Shape, include_usage: bool
) -> AsyncIterator[str]:
    """The event stream; a failure after the first byte is sent as an error event."""
    first = True
    try:
        async for event in events:
            if isinstance(event, str):
                yield sse(shape.delta(event, first=first))
                first = False
                continue
            if first and shape.is_chat:
                yield sse(shape.delta("", first=True))
            yield sse(shape.finish(event))
            if include_usage:
                yield sse(shape.usage_chunk(event))
    except PecSchedError as exc:
        yield sse(from_sdk_error(exc).body())
    except GenerationFailed as exc:
        yield sse(OpenAIError(500, str(exc), "server_error").body())
    yield sse("[DONE]")


async def _collect_unless_gone(
    request: Request, events: AsyncIterator[str | Outcome]
) -> tuple[str, Outcome] | None:
    """The whole text and outcome, or None when the caller disconnected first (the events'
    iteration is then cancelled, which cancels the request)."""

    async def collect() -> tuple[str, Outcome]:
        parts: list[str] = []
        async for event in events:
            if isinstance(event, Outcome):
                return "".join(parts), event
            parts.append(event)
        raise GenerationFailed("the token stream ended without an outcome")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        return None
    try:
        return work.result()
    except PecSchedError as exc:
        raise from_sdk_error(exc) from exc
    except GenerationFailed as exc:
        raise OpenAIError(500, str(exc), "server_error") from exc


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return OpenAIError(exc.status_code, str(exc.detail), kind).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    _log.error("internal error on %s", request.url.path, exc_info=exc)
    return OpenAIError(500, "internal error", "server_error").response()


def build_app(client: AsyncClient, settings: GatewaySettings) -> Starlette:
    """The ASGI application over `client` (the caller keeps and closes the client)."""
    api = OpenAIApi(client, settings)
    routes = [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
    ]
    handlers = {
        OpenAIError: _openai_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers)
