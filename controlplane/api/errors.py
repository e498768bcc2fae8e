"""The error catalog: every domain error code -> gRPC status + public message, in one table.

Servicer methods never build statuses themselves: they raise domain errors (`ApiError` here,
`RuntimeServiceError`, `StoreError`, `CoreError`) and `abort_with` looks the code up in
`CATALOG`, logs the internal detail, attaches a `pecsched.v1.ErrorDetail` (stable code name,
field, retry hint) in the trailing metadata under `ERROR_DETAIL_KEY` (the SDK's convention,
sdk/errors.py) and aborts with the public message. Anything else becomes INTERNAL with a
sanitized message carrying an incident id that is also in the log.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn

import grpc

from controlplane.core.errors import CoreError, ErrorCode
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.store.errors import StoreError, StoreErrorCode
from protos.pecsched.v1 import common_pb2

_log = logging.getLogger(__name__)

# Trailing-metadata key of the serialized ErrorDetail (must equal sdk.errors.ERROR_DETAIL_KEY).
ERROR_DETAIL_KEY = "pecsched-error-detail-bin"

_SC = grpc.StatusCode


class ApiErrorCode(IntEnum):
    """Errors the API layer itself raises (never renumber; add at the end)."""

    INVALID_ARGUMENT = 1  # a request field is malformed (the message names it)
    PROMPT_EMPTY = 2  # no prompt, or an empty one
    PROMPT_TOO_LONG = 3  # above the configured prompt limit
    BAD_MAX_NEW_TOKENS = 4  # max_new_tokens <= 0 or above the limit
    BAD_SAMPLING = 5  # sampling parameters out of range
    TEXT_PROMPT_UNSUPPORTED = 6  # text prompts are off (model with its own tokenizer)
    UNAUTHENTICATED = 7  # no API key, or an unknown/revoked one
    PERMISSION_DENIED = 8  # the key may not do this
    NOT_FOUND = 9  # no such request
    BAD_PAGE_TOKEN = 10  # List page_token not from a previous page
    PROTOCOL_VIOLATION = 11  # an agent broke the Attach protocol
    CHAT_UNSUPPORTED = 12  # a chat prompt, and the served model has no chat template


class ApiError(Exception):
    """An error of the API layer; `message` is public (it names the field, never internals)."""

    def __init__(self, code: ApiErrorCode, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """How one domain error code appears to clients."""

    name: str  # stable ErrorDetail.code
    status: grpc.StatusCode  # gRPC status
    public_message: str | None  # fixed public text; None = the error's own (public) message


_API: dict[ApiErrorCode, CatalogEntry] = {
    ApiErrorCode.INVALID_ARGUMENT: CatalogEntry("INVALID_ARGUMENT", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.PROMPT_EMPTY: CatalogEntry("PROMPT_EMPTY", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.PROMPT_TOO_LONG: CatalogEntry("PROMPT_TOO_LONG", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.BAD_MAX_NEW_TOKENS: CatalogEntry("BAD_MAX_NEW_TOKENS", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.BAD_SAMPLING: CatalogEntry("BAD_SAMPLING", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.TEXT_PROMPT_UNSUPPORTED: CatalogEntry(
        "TEXT_PROMPT_UNSUPPORTED", _SC.INVALID_ARGUMENT, None
    ),
    ApiErrorCode.UNAUTHENTICATED: CatalogEntry("UNAUTHENTICATED", _SC.UNAUTHENTICATED, None),
    ApiErrorCode.PERMISSION_DENIED: CatalogEntry("PERMISSION_DENIED", _SC.PERMISSION_DENIED, None),
    ApiErrorCode.NOT_FOUND: CatalogEntry("NOT_FOUND", _SC.NOT_FOUND, None),
    ApiErrorCode.BAD_PAGE_TOKEN: CatalogEntry("BAD_PAGE_TOKEN", _SC.INVALID_ARGUMENT, None),
    ApiErrorCode.PROTOCOL_VIOLATION: CatalogEntry(
        "PROTOCOL_VIOLATION", _SC.FAILED_PRECONDITION, None
    ),
    ApiErrorCode.CHAT_UNSUPPORTED: CatalogEntry("CHAT_UNSUPPORTED", _SC.INVALID_ARGUMENT, None),
}

_RUNTIME: dict[RuntimeErrorCode, CatalogEntry] = {
    RuntimeErrorCode.QUEUE_FULL: CatalogEntry("QUEUE_FULL", _SC.RESOURCE_EXHAUSTED, None),
    RuntimeErrorCode.TENANT_LIMIT: CatalogEntry("TENANT_LIMIT", _SC.RESOURCE_EXHAUSTED, None),
    RuntimeErrorCode.SHUTTING_DOWN: CatalogEntry(
        "SHUTTING_DOWN", _SC.UNAVAILABLE, "the control plane is shutting down; retry shortly"
    ),
    RuntimeErrorCode.PROMPT_TOO_LONG: CatalogEntry("PROMPT_TOO_LONG", _SC.INVALID_ARGUMENT, None),
    RuntimeErrorCode.AGENT_REJECTED: CatalogEntry("AGENT_REJECTED", _SC.FAILED_PRECONDITION, None),
    RuntimeErrorCode.NOT_ATTACHED: CatalogEntry("NOT_ATTACHED", _SC.FAILED_PRECONDITION, None),
    RuntimeErrorCode.PROMPT_BUDGET: CatalogEntry("PROMPT_BUDGET", _SC.RESOURCE_EXHAUSTED, None),
    RuntimeErrorCode.KEY_REUSED: CatalogEntry(
        "IDEMPOTENCY_KEY_REUSED",
        _SC.ALREADY_EXISTS,
        "idempotency_key: already used for a request with other content; use a new key",
    ),
    RuntimeErrorCode.REBUILDING: CatalogEntry(
        "REBUILDING", _SC.UNAVAILABLE, "the control plane is recovering its state; retry shortly"
    ),
}

_STORE: dict[StoreErrorCode, CatalogEntry] = {
    StoreErrorCode.UNAVAILABLE: CatalogEntry(
        "DATABASE_UNAVAILABLE", _SC.UNAVAILABLE, "the database is unavailable; retry shortly"
    ),
    StoreErrorCode.NOT_FOUND: CatalogEntry("NOT_FOUND", _SC.NOT_FOUND, "not found"),
    StoreErrorCode.ALREADY_EXISTS: CatalogEntry(
        "ALREADY_EXISTS", _SC.ALREADY_EXISTS, "already exists"
    ),
    StoreErrorCode.CONFLICT: CatalogEntry(
        "CONFLICT", _SC.ABORTED, "the request changed concurrently; retry"
    ),
    StoreErrorCode.SCHEMA_OUTDATED: CatalogEntry(
        "SCHEMA_OUTDATED", _SC.FAILED_PRECONDITION, "the database schema is outdated"
    ),
}

_CORE: dict[ErrorCode, CatalogEntry] = {
    ErrorCode.INVALID_ARGUMENT: CatalogEntry("INVALID_ARGUMENT", _SC.INVALID_ARGUMENT, None),
    ErrorCode.UNKNOWN_REQUEST: CatalogEntry("NOT_FOUND", _SC.NOT_FOUND, "no such request"),
    ErrorCode.REQUEST_NEVER_FITS: CatalogEntry("PROMPT_TOO_LONG", _SC.INVALID_ARGUMENT, None),
}

INTERNAL = CatalogEntry("INTERNAL", _SC.INTERNAL, "internal error")

# Every catalog table, for documentation and the exhaustiveness test.
CATALOG: dict[type, dict[IntEnum, CatalogEntry]] = {
    ApiError: dict(_API.items()),
    RuntimeServiceError: dict(_RUNTIME.items()),
    StoreError: dict(_STORE.items()),
    CoreError: dict(_CORE.items()),
}


@dataclass(frozen=True, slots=True)
class Resolved:
    """A domain error resolved for the wire."""

    entry: CatalogEntry
    message: str  # public message
    field: str  # request field at fault, "" if none
    retry_after_s: float | None  # back-off hint


def resolve(exc: BaseException) -> Resolved:
    """The public form of `exc` (INTERNAL for anything not in the catalog)."""
    entry: CatalogEntry | None = None
    field, retry = "", None
    if isinstance(exc, ApiError):
        entry, field = _API[exc.code], exc.field
    elif isinstance(exc, RuntimeServiceError):
        entry, field, retry = _RUNTIME[exc.code], exc.field, exc.retry_after_s
    elif isinstance(exc, StoreError):
        entry = _STORE[exc.code]
    elif isinstance(exc, CoreError):
        entry = _CORE.get(exc.code)
        field = getattr(exc, "field", "")
    if entry is None:
        return Resolved(INTERNAL, INTERNAL.public_message or "internal error", "", None)
    message = entry.public_message or str(getattr(exc, "message", exc))
    return Resolved(entry, message, field, retry)


def error_detail(resolved: Resolved) -> bytes:
    """The serialized ErrorDetail for `resolved`."""
    detail = common_pb2.ErrorDetail(code=resolved.entry.name, field=resolved.field)
    if resolved.retry_after_s is not None:
        detail.retry_after_s = resolved.retry_after_s
    return detail.SerializeToString()


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Log `exc` and end the RPC with its catalog status (see the module docstring)."""
    resolved = resolve(exc)
    message = resolved.message
    if resolved.entry is INTERNAL:
        incident = secrets.token_hex(4)
        _log.error("internal error (incident %s)", incident, exc_info=exc)
        message = f"internal error (incident {incident})"
    else:
        _log.info("rpc failed: %s %s: %s", resolved.entry.status.name, resolved.entry.name, exc)
    context.set_trailing_metadata(((ERROR_DETAIL_KEY, error_detail(resolved)),))
    await context.abort(resolved.entry.status, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
