"""`Admission`: the bounds on what the runtime holds, checked before a submit is queued.

Unfinished requests (in the cluster, per tenant) and bytes of prompts held for them (4 a
token; in the cluster, per tenant) are bounded by the Config. Submits waiting for their commit
count as well. Beyond a bound a submit gets RESOURCE_EXHAUSTED with the retry hint. The
committed counts come from each tick (`committed`); pending ones are counted here.
"""

from __future__ import annotations

from collections import Counter

from controlplane.config import Config
from controlplane.core.types import RequestSpec
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError

PROMPT_BYTES_PER_TOKEN = 4  # prompts are held packed, uint32


class Admission:
    """Counts of held requests and prompt bytes, and the check against their bounds."""

    def __init__(self, settings: Config) -> None:
        self.settings = settings
        self.num_active = 0  # unfinished requests (committed)
        self.tenant_active: dict[str, int] = {}  # tenant -> unfinished requests (committed)
        self.tenant_prompt_bytes: dict[str, int] = {}  # tenant -> prompt bytes (committed)
        self._num_pending = 0
        self._pending: Counter[str] = Counter()  # tenant -> pending submits
        self._pending_bytes: Counter[str] = Counter()  # tenant -> prompt bytes of those

    def check(self, spec: RequestSpec) -> None:
        """Refuse a submit beyond a bound.

        Raises:
            RuntimeServiceError: QUEUE_FULL, TENANT_LIMIT or PROMPT_BUDGET (with retry_after_s).
        """
        s, tenant = self.settings, spec.tenant
        if self.num_active + self._num_pending >= s.max_active_requests:
            self._refuse(
                RuntimeErrorCode.QUEUE_FULL,
                f"the cluster holds {s.max_active_requests} unfinished requests",
            )
        tenant_load = self.tenant_active.get(tenant, 0) + self._pending[tenant]
        if tenant_load >= s.max_active_requests_per_tenant:
            self._refuse(
                RuntimeErrorCode.TENANT_LIMIT,
                f"tenant {tenant!r} has {tenant_load} unfinished requests "
                f"(limit {s.max_active_requests_per_tenant})",
            )
        num_bytes = PROMPT_BYTES_PER_TOKEN * spec.prompt_tokens
        mine = self.tenant_prompt_bytes.get(tenant, 0) + self._pending_bytes[tenant]
        budgets = (
            (self.prompt_bytes(), s.prompt_budget_bytes, "the cluster"),
            (mine, s.prompt_budget_bytes_per_tenant, "this tenant"),
        )
        for held, budget, whose in budgets:
            if held + num_bytes > budget:
                self._refuse(
                    RuntimeErrorCode.PROMPT_BUDGET,
                    f"prompt: {whose} holds {held} bytes of queued prompts; "
                    f"{num_bytes} more would exceed the budget of {budget}",
                    field="prompt",
                )

    def prompt_bytes(self) -> int:
        """Bytes of prompts held, pending submits included."""
        return sum(self.tenant_prompt_bytes.values()) + sum(self._pending_bytes.values())

    def count_pending(self, spec: RequestSpec, sign: int) -> None:
        """A submit starts (+1) or stops (-1) waiting for its commit."""
        tenant = spec.tenant
        self._num_pending += sign
        self._pending[tenant] += sign
        self._pending_bytes[tenant] += sign * PROMPT_BYTES_PER_TOKEN * spec.prompt_tokens
        if self._pending[tenant] <= 0:  # tenants come and go: keep no zero entries
            del self._pending[tenant]
            del self._pending_bytes[tenant]

    def committed(
        self, num_active: int, tenant_active: dict[str, int], tenant_prompt_bytes: dict[str, int]
    ) -> None:
        """The counts after a tick's commit."""
        self.num_active = num_active
        self.tenant_active = tenant_active
        self.tenant_prompt_bytes = tenant_prompt_bytes

    def _refuse(self, code: RuntimeErrorCode, message: str, field: str = "") -> None:
        raise RuntimeServiceError(
            code, message, field=field, retry_after_s=self.settings.retry_after_s
        )
