"""Submit validation: a SubmitRequest -> a NewRequest, or ApiError naming the field.

Checked here, before the request reaches the runtime: a prompt is present and non-empty (text and
chat are tokenized by the served model's text codec, controlplane/text/, or refused when there is
none), at most `max_prompt_tokens` long; 0 < max_new_tokens <= `max_new_tokens_limit`; sampling
parameters in range; token ids below the vocabulary size when it is known (the Config's
`vocab_size`, or what the agents of the served model reported, the smaller of both); the tenant is
the caller's (client keys); the deadline lies in the future. Lengths, NUL characters and numeric
ranges of every field were checked before (controlplane/api/limits.py). Whether the cluster could
ever hold the request is checked by the policy inside the tick (PROMPT_TOO_LONG), because only the
policy knows the cluster; whether a reused idempotency key asks for the same request, inside the
tick too (controlplane/runtime/ticker.py).
"""

from __future__ import annotations

import os
import threading
from array import array

from controlplane.api import convert
from controlplane.api.auth import Principal, require_tenant
from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.config import Config
from controlplane.core.errors import InvalidArgumentError
from controlplane.core.types import RequestSpec, classify
from controlplane.store.records import NewRequest
from controlplane.text.chat import ChatTemplateError, ChatTurn, ChatUnsupportedError
from controlplane.text.codec import TextCodec
from protos.pecsched.v1 import inference_pb2

REQUEST_ID_RANDOM_BITS = 128


_ID_BYTES = REQUEST_ID_RANDOM_BITS // 8
_IDS_PER_DRAW = 256  # one getrandom call per 256 ids (a call costs as much as the rest of one)


class _RandomIds:
    """Request ids cut from the OS's CSPRNG, drawn in blocks; every byte is used once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._at = 0

    def next(self) -> str:
        with self._lock:
            if self._at == len(self._block):
                self._block, self._at = os.urandom(_ID_BYTES * _IDS_PER_DRAW), 0
            block, start = self._block, self._at
            self._at += _ID_BYTES
        return "req-" + block[start : start + _ID_BYTES].hex()


_random_ids = _RandomIds()


def new_request_id() -> str:
    """A fresh request id, `req-` and 128 random bits in hex: ids are unique across restarts
    and processes, and one id tells nothing about any other."""
    return _random_ids.next()


def new_request_from_proto(
    request: inference_pb2.SubmitRequest,
    principal: Principal,
    config: Config,
    now_s: float,
    request_id: str,
    text_codec: TextCodec | None,
    vocab_size: int | None,
) -> NewRequest:
    """Validate `request` and build the request to persist (arrival = `now_s`); text and chat
    prompts are tokenized by `text_codec` (None: refused); every token id must be below
    `vocab_size` (None: unknown, not checked)."""
    prompt = _prompt_ids(request, config, text_codec, vocab_size)
    if not 0 < request.max_new_tokens <= config.max_new_tokens_limit:
        raise ApiError(
            ApiErrorCode.BAD_MAX_NEW_TOKENS,
            f"max_new_tokens: must be in [1, {config.max_new_tokens_limit}], "
            f"got {request.max_new_tokens}",
            field="max_new_tokens",
        )
    sampling = convert.sampling_from_proto(request.sampling)
    tenant = request.tenant or principal.tenant
    require_tenant(principal, tenant)
    key = request.idempotency_key or None
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
    request: inference_pb2.SubmitRequest,
    config: Config,
    text_codec: TextCodec | None,
    vocab_size: int | None,
) -> array[int]:
    """The prompt's token ids, packed (held so until the runtime lets the request go)."""
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
        ids = array("I", text_codec.encode(request.text))
    elif which == "chat":
        assert text_codec is not None
        ids = array("I", _chat_ids(request.chat, text_codec))
    elif which == "token_ids":
        ids = array("I", request.token_ids.ids)
    else:
        ids = array("I")
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
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT,
            f"prompt.token_ids: every id must be below the vocabulary size {vocab_size}",
            field="prompt.token_ids",
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
