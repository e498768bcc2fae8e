"""Submit validation: a SubmitRequest -> a NewRequest, or ApiError naming the field.

Checked here, before the request reaches the runtime: a prompt is present and non-empty (text
and chat are tokenized by the served model's text codec, controlplane/text/, or refused when
there is none), at most
`max_prompt_tokens` long; 0 < max_new_tokens <= `max_new_tokens_limit`; sampling parameters
in range; the tenant is the caller's (client keys); the deadline lies in the future; ids and
keys have sane lengths. Whether the cluster could ever hold the request is checked by the
policy inside the tick (PROMPT_TOO_LONG), because only the policy knows the cluster.
"""

from __future__ import annotations

import itertools
import secrets

from controlplane.api import convert
from controlplane.api.auth import Principal, require_tenant
from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.config import Config
from controlplane.core.errors import InvalidArgumentError
from controlplane.core.types import RequestSpec, classify
from controlplane.store.records import UINT32_MAX, NewRequest
from controlplane.text.chat import ChatTemplateError, ChatTurn, ChatUnsupportedError
from controlplane.text.codec import TextCodec
from protos.pecsched.v1 import inference_pb2

MAX_TENANT_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 256


class RequestIds:
    """Request ids `req-<96 random bits of this process>-<counter>`: unique across restarts
    without a random draw per request."""

    def __init__(self) -> None:
        self._prefix = f"req-{secrets.token_hex(12)}-"
        self._counter = itertools.count(1)

    def next_id(self) -> str:
        """A new request id."""
        return f"{self._prefix}{next(self._counter):x}"


def new_request_from_proto(
    request: inference_pb2.SubmitRequest,
    principal: Principal,
    config: Config,
    now_s: float,
    request_id: str,
    text_codec: TextCodec | None,
) -> NewRequest:
    """Validate `request` and build the request to persist (arrival = `now_s`); text and chat
    prompts are tokenized by `text_codec` (None: refused)."""
    prompt = _prompt_ids(request, config, text_codec)
    if not 0 < request.max_new_tokens <= config.max_new_tokens_limit:
        raise ApiError(
            ApiErrorCode.BAD_MAX_NEW_TOKENS,
            f"max_new_tokens: must be in [1, {config.max_new_tokens_limit}], "
            f"got {request.max_new_tokens}",
            field="max_new_tokens",
        )
    sampling = convert.sampling_from_proto(request.sampling)
    tenant = request.tenant or principal.tenant
    if len(tenant) > MAX_TENANT_CHARS:
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT,
            f"tenant: at most {MAX_TENANT_CHARS} characters",
            field="tenant",
        )
    require_tenant(principal, tenant)
    key = request.idempotency_key or None
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT,
            f"idempotency_key: at most {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            field="idempotency_key",
        )
    deadline_s = None
    if request.HasField("deadline"):
        deadline_s = convert.timestamp_to_seconds(request.deadline)
        if deadline_s <= now_s:
            raise ApiError(
                ApiErrorCode.INVALID_ARGUMENT,
                "deadline: must lie in the future",
                field="deadline",
            )
    try:
        spec = RequestSpec(
            request_id=request_id,
            tenant=tenant,
            prompt_tokens=len(prompt),
            max_new_tokens=request.max_new_tokens,
            priority=request.priority,
            arrival_s=now_s,
            deadline_s=deadline_s,
        )
    except InvalidArgumentError as exc:
        raise ApiError(ApiErrorCode.INVALID_ARGUMENT, str(exc), field=exc.field) from exc
    request_class = classify(spec.prompt_tokens, config.scheduler.short_threshold_tokens)
    return NewRequest(spec, request_class, prompt, sampling, key)


def _prompt_ids(
    request: inference_pb2.SubmitRequest, config: Config, text_codec: TextCodec | None
) -> list[int]:
    which = request.WhichOneof("prompt")
    if which in ("text", "chat") and text_codec is None:
        raise ApiError(
            ApiErrorCode.TEXT_PROMPT_UNSUPPORTED,
            f"prompt.{which}: this control plane has no tokenizer for the served model; "
            "send prompt.token_ids instead",
            field=f"prompt.{which}",
        )
    if which == "text":
        assert text_codec is not None
        ids = text_codec.encode(request.text)
    elif which == "chat":
        assert text_codec is not None
        ids = _chat_ids(request.chat, text_codec)
    elif which == "token_ids":
        ids = list(request.token_ids.ids)
    else:
        ids = []
    if not ids:
        raise ApiError(
            ApiErrorCode.PROMPT_EMPTY,
            "prompt: set prompt.text or prompt.token_ids to a non-empty prompt",
            field="prompt",
        )
    if len(ids) > config.max_prompt_tokens:
        raise ApiError(
            ApiErrorCode.PROMPT_TOO_LONG,
            f"prompt: {len(ids)} tokens, at most {config.max_prompt_tokens} are accepted",
            field="prompt",
        )
    if max(ids) > UINT32_MAX:  # pragma: no cover - uint32 on the wire
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT, "prompt.token_ids: out of range", field="prompt"
        )
    return ids


def _chat_ids(chat: inference_pb2.ChatMessages, text_codec: TextCodec) -> list[int]:
    turns = [ChatTurn(m.role, m.content) for m in chat.messages]
    try:
        return text_codec.encode_chat(turns)
    except ChatUnsupportedError as exc:
        raise ApiError(
            ApiErrorCode.CHAT_UNSUPPORTED, f"prompt.chat: {exc}", field="prompt.chat"
        ) from exc
    except ChatTemplateError as exc:
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT, f"prompt.chat: {exc}", field="prompt.chat"
        ) from exc
