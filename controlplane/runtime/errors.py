"""Domain errors of the runtime (the API's error catalog maps `code` to a gRPC status)."""

from __future__ import annotations

from enum import IntEnum


class RuntimeErrorCode(IntEnum):
    """Stable codes of runtime errors (never renumber; add at the end)."""

    QUEUE_FULL = 1  # too many unfinished requests in the cluster
    TENANT_LIMIT = 2  # too many unfinished requests of one tenant
    SHUTTING_DOWN = 3  # the control plane is stopping (or stopped after a fatal error)
    PROMPT_TOO_LONG = 4  # the cluster can never hold the request (admission check)
    AGENT_REJECTED = 5  # an agent's registration was refused (conflict, wrong model)
    NOT_ATTACHED = 6  # an agent message arrived without (or after losing) its registration
    REBUILDING = 7  # a submit failed twice while the runtime rebuilt its state; retry
    KEY_REUSED = 8  # an idempotency key already names a request with other content
    PROMPT_BUDGET = 9  # the prompts held for unfinished requests would exceed their byte budget


class RuntimeServiceError(Exception):
    """Base of runtime errors; `code` says which, `field` names the request field if any."""

    def __init__(
        self,
        code: RuntimeErrorCode,
        message: str,
        *,
        field: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
