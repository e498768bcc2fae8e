"""Store domain errors: every database failure surfaces as one of these, translated once.

`controlplane.api` maps `StoreError.code` to a gRPC status in its error catalog; nothing
outside `controlplane/store` sees a SQLAlchemy or DB-API exception.
"""

from __future__ import annotations

from enum import IntEnum


class StoreErrorCode(IntEnum):
    """Stable codes of store failures (the API's error catalog keys on these)."""

    UNAVAILABLE = 1  # the database cannot be reached or is locked/overloaded; retryable
    NOT_FOUND = 2  # the addressed row does not exist
    ALREADY_EXISTS = 3  # a row with this identity exists (and is not an idempotent replay)
    CONFLICT = 4  # the row changed under us (state precondition failed) or violates a rule
    SCHEMA_OUTDATED = 5  # the database schema is not at the code's migration head


class StoreError(Exception):
    """Base of store errors; `code` says which kind, the message carries the detail."""

    code: StoreErrorCode = StoreErrorCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(StoreError):
    """The database is unreachable, locked, or failed in an operational way (retryable)."""

    code = StoreErrorCode.UNAVAILABLE


class NotFound(StoreError):
    """The addressed request, node, instance or key does not exist."""

    code = StoreErrorCode.NOT_FOUND


class AlreadyExists(StoreError):
    """A row with the same identity exists already."""

    code = StoreErrorCode.ALREADY_EXISTS


class Conflict(StoreError):
    """A precondition failed (e.g. the request is not in the expected state) or a rule broke."""

    code = StoreErrorCode.CONFLICT


class SchemaOutdated(StoreError):
    """The database is not at the migration head; the message names the command that fixes it."""

    code = StoreErrorCode.SCHEMA_OUTDATED
