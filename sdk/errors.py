"""Typed exceptions the SDK raises for gRPC errors, and the error-detail metadata convention.

Every failed RPC surfaces as a subclass of `PecSchedError`, chosen by the gRPC status code:

=====================  ==========================  =========================================
status code            exception                   retried by the client
=====================  ==========================  =========================================
INVALID_ARGUMENT       InvalidArgumentError        never (`.field` names the bad field)
UNAUTHENTICATED        UnauthenticatedError        never
PERMISSION_DENIED      PermissionDeniedError       never
NOT_FOUND              NotFoundError               never
RESOURCE_EXHAUSTED     ResourceExhaustedError      only with `retry_resource_exhausted`
UNAVAILABLE            UnavailableError            yes, with exponential backoff and jitter
DEADLINE_EXCEEDED      DeadlineExceededError       never (the caller's deadline is spent)
anything else          PecSchedError               never
=====================  ==========================  =========================================

Error-detail convention (for the server side): a server that wants to tell the client more than
a status code and message attaches one serialized `pecsched.v1.ErrorDetail` message in the
**trailing metadata** under the binary key `pecsched-error-detail-bin` (`ERROR_DETAIL_KEY`).
gRPC base64-encodes `-bin` values on the wire; both ends see raw bytes. In a Python servicer
(sync or grpc.aio), set the trailing metadata first, then abort:

    detail = ErrorDetail(code="MAX_NEW_TOKENS_TOO_LARGE", field="max_new_tokens")
    context.set_trailing_metadata((("pecsched-error-detail-bin", detail.SerializeToString()),))
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens above 4096")

`ErrorDetail.code` is the stable catalog name (`.detail_code` here), `field` the request field at
fault (`InvalidArgumentError.field`), `retry_after_s` a back-off hint
(`ResourceExhaustedError.retry_after_s`). A missing or undecodable detail is not an error: the
exception then carries only the status code and message.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from protos.pecsched.v1 import common_pb2

# Trailing-metadata key of the serialized `pecsched.v1.ErrorDetail` (see the module docstring).
ERROR_DETAIL_KEY = "pecsched-error-detail-bin"


class PecSchedError(Exception):
    """A failed call to the control plane.

    Attributes:
        status: the gRPC status code name, e.g. "UNAVAILABLE".
        message: the server's (public) message.
        detail_code: the catalog code from `ErrorDetail.code`; empty when not sent.
    """

    def __init__(self, status: str, message: str, detail_code: str = "") -> None:
        super().__init__(f"{status}: {message}" + (f" [{detail_code}]" if detail_code else ""))
        self.status = status
        self.message = message
        self.detail_code = detail_code


class InvalidArgumentError(PecSchedError):
    """The request was malformed; `field` names the request field at fault when known."""

    def __init__(self, status: str, message: str, detail_code: str = "", field: str = "") -> None:
        super().__init__(status, message, detail_code)
        self.field = field


class UnauthenticatedError(PecSchedError):
    """No API key, or one the control plane does not know."""


class PermissionDeniedError(PecSchedError):
    """The API key may not do this (e.g. another tenant's request)."""


class NotFoundError(PecSchedError):
    """No such request."""


class ResourceExhaustedError(PecSchedError):
    """Quota or queue full; `retry_after_s` is the server's back-off hint (None if not given)."""

    def __init__(
        self, status: str, message: str, detail_code: str = "", retry_after_s: float | None = None
    ) -> None:
        super().__init__(status, message, detail_code)
        self.retry_after_s = retry_after_s


class UnavailableError(PecSchedError):
    """The control plane could not be reached (after the client's retries)."""


class DeadlineExceededError(PecSchedError):
    """The call's deadline passed before it completed."""


class ProtocolError(PecSchedError):
    """The server broke the wire contract (e.g. a token stream skipped indices)."""

    def __init__(self, message: str) -> None:
        super().__init__("PROTOCOL", message)


_SIMPLE: dict[str, type[PecSchedError]] = {
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}


def parse_error_detail(
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
) -> common_pb2.ErrorDetail | None:
    """The `ErrorDetail` under `ERROR_DETAIL_KEY` in `trailing_metadata`, or None if absent/bad."""
    for key, value in trailing_metadata or ():
        if key != ERROR_DETAIL_KEY or not isinstance(value, bytes):
            continue
        detail = common_pb2.ErrorDetail()
        try:
            detail.ParseFromString(value)
        except DecodeError:
            return None
        return detail
    return None


def error_from_status(
    status: str,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> PecSchedError:
    """The typed exception for a gRPC status code name, message and trailing metadata."""
    detail = parse_error_detail(trailing_metadata)
    code = detail.code if detail is not None else ""
    if status == "INVALID_ARGUMENT":
        field = detail.field if detail is not None else ""
        return InvalidArgumentError(status, message, code, field=field)
    if status == "RESOURCE_EXHAUSTED":
        retry_after_s = detail.retry_after_s if detail is not None else 0.0
        return ResourceExhaustedError(
            status, message, code, retry_after_s=retry_after_s if retry_after_s > 0 else None
        )
    return _SIMPLE.get(status, PecSchedError)(status, message, code)
