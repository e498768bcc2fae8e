"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP code.

The SDK's typed errors (one per gRPC status) map to the HTTP status OpenAI uses for the same
condition; the control plane's field names map to the OpenAI parameter at fault.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from sdk.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PecSchedError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

# Control-plane request fields -> the OpenAI parameter a caller set.
_PARAMS = {
    "max_new_tokens": "max_tokens",
    "prompt": "prompt",
    "prompt.text": "prompt",
    "prompt.token_ids": "prompt",
    "prompt.chat": "messages",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.seed": "seed",
}


class OpenAIError(Exception):
    """An error to send as OpenAI does."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code  # HTTP status
        self.message = message
        self.type = type  # invalid_request_error, authentication_error, rate_limit_error, ...
        self.param = param  # the request parameter at fault
        self.code = code  # e.g. model_not_found, invalid_api_key
        self.retry_after_s = retry_after_s  # sent as Retry-After

    def body(self) -> dict[str, object]:
        """The JSON body: {"error": {...}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The HTTP response."""
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def invalid_request(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    """A 400 invalid_request_error."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def from_sdk_error(exc: PecSchedError) -> OpenAIError:
    """The OpenAI form of a control-plane error."""
    if isinstance(exc, InvalidArgumentError):
        param = _PARAMS.get(exc.field, exc.field or None)
        return invalid_request(exc.message, param, exc.detail_code.lower() or None)
    if isinstance(exc, UnauthenticatedError):
        return OpenAIError(401, exc.message, "authentication_error", None, "invalid_api_key")
    if isinstance(exc, PermissionDeniedError):
        return OpenAIError(403, exc.message, "permission_error")
    if isinstance(exc, NotFoundError):
        return OpenAIError(404, exc.message, "not_found_error")
    if isinstance(exc, ResourceExhaustedError):
        code = exc.detail_code.lower() or None
        return OpenAIError(429, exc.message, "rate_limit_error", None, code, exc.retry_after_s)
    if isinstance(exc, UnavailableError):
        return OpenAIError(503, exc.message, "server_error", None, "unavailable")
    if isinstance(exc, DeadlineExceededError):
        return OpenAIError(504, exc.message, "server_error", None, "timeout")
    return OpenAIError(500, exc.message, "server_error")
