"""`reservation`: dedicated long-request instances plus a length router (baseline).

Instances with the LONG_RESERVED role (a configured count, by default just enough for one SP
group to hold `reservation_sized_for_tokens`) serve only long requests, first-come-first-served
on the smallest SP group of open reserved instances; the GENERAL instances serve only short
requests, first-come-first-served, each decoding where it prefilled. Reserved instances idle
when no long request runs, which is the weakness the paper measures. With no reserved
instance up at all (a one-instance cluster), long requests use general instances.
"""

from __future__ import annotations

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.config import SchedulerConfig
from controlplane.core.policies.fifo import SHORT_SLOTS
from controlplane.core.roles import reservation_plan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass


class ReservationPolicy(BasePolicy):
    """Long requests on reserved instances, short ones on the rest; routed by length."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, reservation_plan(config))

    def _prefill_role(self, request_class: RequestClass) -> InstanceRole:
        if request_class is RequestClass.SHORT:
            return InstanceRole.GENERAL
        if self._state.census.count(InstanceRole.LONG_RESERVED) == 0:
            return InstanceRole.GENERAL
        return InstanceRole.LONG_RESERVED

    def _plan(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(RequestClass.SHORT)) is not None:
            if not self._place_short(req, now_s, out, SHORT_SLOTS, decode_in_place=True):
                if not self._reject_if_never_fits(req, out):
                    break
        while (req := self._head(RequestClass.LONG)) is not None:
            role = self._prefill_role(RequestClass.LONG)
            if not self._place_long(req, now_s, out, role):
                if not self._reject_if_never_fits(req, out):
                    return
