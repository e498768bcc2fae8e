"""`priority`: short = high, long = low, non-preemptive (LightLLM Past-Future style baseline).

Short requests are served first-come-first-served (higher `priority` first) on open general
instances, decoding where they prefilled, or on an instance decoding a long request (stalling
it) when nothing is open. A long request starts only when no short request waits, on the
smallest SP group of open instances holding its KV, and then runs to completion: a running
long prefill is never paused, so it still blocks the shorts that arrive after it starts.
"""

from __future__ import annotations

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.config import SchedulerConfig
from controlplane.core.policies.fifo import SHORT_SLOTS
from controlplane.core.roles import all_general
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass


class PriorityPolicy(BasePolicy):
    """Two class queues; longs only when no short waits; no preemption."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, all_general)

    def _plan(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(RequestClass.SHORT)) is not None:
            if not self._place_short(req, now_s, out, SHORT_SLOTS, decode_in_place=True):
                if not self._reject_if_never_fits(req, out):
                    return  # a short waits: no long may start
        while (req := self._head(RequestClass.LONG)) is not None:
            if not self._place_long(req, now_s, out, InstanceRole.GENERAL):
                if not self._reject_if_never_fits(req, out):
                    return
