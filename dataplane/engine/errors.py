"""Engine errors: one exception type carrying a stable code the agent can map to the wire."""

from __future__ import annotations

from enum import IntEnum


class EngineErrorCode(IntEnum):
    """Why the engine refused an operation."""

    DOES_NOT_FIT = 1  # the KV cache (or a length limit) cannot hold the request
    UNKNOWN_REQUEST = 2  # no request with that id is resident
    INVALID_STATE = 3  # the request is not in a state that allows the operation
    INVALID_ARGUMENT = 4  # a field is out of range; the message names it
    KV_MISMATCH = 5  # imported KV does not match this engine's model layout


class EngineError(Exception):
    """A refused engine operation; `code` says why, the message gives the numbers."""

    def __init__(self, code: EngineErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
