"""Domain errors of the scheduling core, each carrying a stable `ErrorCode`.

The API layer (controlplane/api/errors.py) maps codes to gRPC status codes; the core never
knows about gRPC. `IllegalTransitionError` lives with the rules that raise it
(controlplane/core/lifecycle.py), so this module imports nothing of the core.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Stable codes of core errors (never renumber; add at the end)."""

    INVALID_ARGUMENT = 1  # a field of a spec or config is out of range
    ILLEGAL_TRANSITION = 2  # a lifecycle rule refused a state change
    UNKNOWN_REQUEST = 3  # no request with that id
    DUPLICATE_REQUEST = 4  # a request with that id already exists
    UNKNOWN_INSTANCE = 5  # no instance with that id
    DUPLICATE_INSTANCE = 6  # an instance with that id is already up
    KV_CAPACITY_EXCEEDED = 7  # an allocation would exceed an instance's KV capacity
    REQUEST_NEVER_FITS = 8  # the cluster can never hold the request's KV


class CoreError(Exception):
    """Base class of domain errors; `code` says which."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidArgumentError(CoreError, ValueError):
    """A spec or config field is invalid; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field


class KvCapacityError(CoreError):
    """An allocation of `tokens` on `instance_id` would exceed its KV capacity."""

    def __init__(self, instance_id: str, tokens: int, free_tokens: int) -> None:
        super().__init__(
            ErrorCode.KV_CAPACITY_EXCEEDED,
            f"instance {instance_id!r}: cannot allocate {tokens} KV tokens, {free_tokens} free",
        )
        self.instance_id = instance_id
        self.tokens = tokens
        self.free_tokens = free_tokens
