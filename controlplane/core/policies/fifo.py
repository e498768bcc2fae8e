"""`fifo`: one first-come-first-served queue for every length (the LoongServe-style baseline).

The oldest request (higher `priority` first) starts as soon as it fits; nothing behind it starts
before it does (head-of-line blocking, the weakness the paper measures). A short request
prefills on the open general instance with the most free KV and decodes there (prefill and
decode mix, continuous batching); when none is open it may prefill on an instance decoding a
long request, stalling that decode. A long request gets an elastic SP group: the fewest open
instances whose free KV holds prompt + output, then decodes on that group. No preemption.
"""

from __future__ import annotations

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.config import SchedulerConfig
from controlplane.core.records import Slot
from controlplane.core.roles import all_general
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass

SHORT_SLOTS = (Slot.OPEN, Slot.LONG_DECODE)


class FifoPolicy(BasePolicy):
    """One FCFS queue; long requests on elastic SP groups; strict head-of-line order."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, all_general)

    def _plan(self, now_s: float, out: list[Action]) -> None:
        while (req := self._oldest()) is not None:
            if req.request_class is RequestClass.SHORT:
                placed = self._place_short(req, now_s, out, SHORT_SLOTS, decode_in_place=True)
            else:
                placed = self._place_long(req, now_s, out, InstanceRole.GENERAL)
            if not placed and not self._reject_if_never_fits(req, out):
                return  # head-of-line: nothing overtakes the oldest request
