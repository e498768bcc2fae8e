"""`RefusalBackoff`: the one back-off rule for placements an instance refused.

An instance that refused a request (a retryable failure, e.g. KV fragmentation) is skipped
for it until the instance's free KV changes or the back-off passes. The back-off of the k-th
retryable failure in a row is `refused_instance_backoff_s * 2**(k-1)`, at most
`refused_instance_backoff_max_s` (`refusal_backoff_s`), so an instance that keeps refusing a
request is not offered it in a tight loop. The live runtime and the simulator both drive it
through `ClusterState`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

from controlplane.core.accounting import KvLedger
from controlplane.core.config import SchedulerConfig
from controlplane.core.records import RequestRecord


def refusal_backoff_s(config: SchedulerConfig, failures_in_row: int) -> float:
    """Back-off after the `failures_in_row`-th (>= 1) retryable failure in a row."""
    backoff_s = config.refused_instance_backoff_s * 2.0 ** min(failures_in_row - 1, 32)
    return min(backoff_s, config.refused_instance_backoff_max_s)


class RefusalBackoff:
    """Refusals per request (kept on `RequestRecord.refusals`) and when their back-offs end."""

    def __init__(self, config: SchedulerConfig, ledger: KvLedger) -> None:
        self._config = config
        self._ledger = ledger
        self.expiries: list[float] = []  # when refusal back-offs end, a heap (a plan timer)

    def remember(self, req: RequestRecord, instance_ids: Iterable[str], at_s: float) -> None:
        """`instance_ids` refused `req` at `at_s`: skip them for it (see `is_refused`)."""
        req.failures_in_row += 1
        until_s = at_s + refusal_backoff_s(self._config, req.failures_in_row)
        for instance_id in instance_ids:
            req.refusals[instance_id] = (self._ledger.free_tokens(instance_id), until_s)
        heapq.heappush(self.expiries, until_s)

    def is_refused(self, req: RequestRecord, instance_id: str, now_s: float) -> bool:
        """True while `instance_id`'s refusal of `req` stands (same free KV, back-off
        running); a lapsed refusal is forgotten."""
        entry = req.refusals.get(instance_id)
        if entry is None:
            return False
        free_then, until_s = entry
        if now_s < until_s and self._ledger.free_tokens(instance_id) == free_then:
            return True
        del req.refusals[instance_id]
        return False

    def pop_lapsed(self, now_s: float) -> bool:
        """Drop the back-offs ended at or before `now_s`; True when one did (a refused
        placement may be retried)."""
        expiries, lapsed = self.expiries, False
        while expiries and expiries[0] <= now_s:
            heapq.heappop(expiries)
            lapsed = True
        return lapsed

    def next_lapse_s(self) -> float:
        """When the earliest back-off ends (inf: none)."""
        return self.expiries[0] if self.expiries else math.inf
