"""`reservation`: dedicated long-request instances plus a length router (baseline).

Instances with the LONG_RESERVED role serve only long requests, first-come-first-served on the
smallest SP group of open reserved instances; the GENERAL instances serve only short requests,
first-come-first-served, each decoding where it prefilled. Reserved instances idle when no long
request runs, which is the weakness the paper measures. With no reserved instance up at all (a
one-instance cluster), long requests use general instances.

Reserve size: `num_long_reserved_instances` when set (fixed as instances come up). Otherwise it
starts at the instances that hold `reservation_sized_for_tokens` in one SP group and follows the
workload: the reserve gets the long class's share of the work of the requests that
arrived so far, round(share x instances), at least the instances that hold
`reservation_sized_for_tokens` in one SP group and at most all but one. A request's work is its
model FLOPs in token units, `work_tokens`: every prompt and output token through the weights
plus its attention pairs, weighed by `reservation_attention_tokens` (with batched decodes GPU time
follows FLOPs: on the Azure traces the long share is 0.97 of FLOPs, 0.94-0.96 of GPU time). The
split moves as arrivals change the share: an empty instance changes role, a busy one never.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.config import SchedulerConfig
from controlplane.core.events import Event, RequestArrived
from controlplane.core.policies.fifo import SHORT_SLOTS
from controlplane.core.records import Slot
from controlplane.core.roles import reservation_plan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, classify

_RESERVED = InstanceRole.LONG_RESERVED
_GENERAL = InstanceRole.GENERAL


def work_tokens(prompt_tokens: int, output_tokens: int, attention_tokens: int) -> float:
    """A request's model FLOPs in units of one token's linear FLOPs: (prompt + output) tokens
    plus (prompt²/2 + prompt x output) attention pairs / `attention_tokens`."""
    pairs = prompt_tokens * prompt_tokens / 2 + prompt_tokens * output_tokens
    return prompt_tokens + output_tokens + pairs / attention_tokens


class ReservationPolicy(BasePolicy):
    """Long requests on reserved instances, short ones on the rest; routed by length."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, reservation_plan(config))
        self._adaptive = config.num_long_reserved_instances is None
        self._work = dict.fromkeys(RequestClass, 0.0)  # work_tokens of arrivals, by class

    def observe(self, events: Sequence[Event]) -> None:
        """Apply events (see BasePolicy) and count the work of arrivals by class."""
        super().observe(events)
        cfg = self._config
        for event in events:
            if isinstance(event, RequestArrived):
                spec = event.spec
                request_class = classify(spec.prompt_tokens, cfg.short_threshold_tokens)
                work = work_tokens(
                    spec.prompt_tokens, spec.max_new_tokens, cfg.reservation_attention_tokens
                )
                self._work[request_class] += work

    def target_reserved(self) -> int:
        """Reserve size the work share asks for, with the current instance count."""
        st, cfg = self._state, self._config
        num = st.census.count(_GENERAL) + st.census.count(_RESERVED)
        if num <= 1:
            return 0
        capacity = max(st.census.capacities(_GENERAL) + st.census.capacities(_RESERVED))
        floor = min(cfg.max_sp_degree, math.ceil(cfg.reservation_sized_for_tokens / capacity))
        total = sum(self._work.values())
        share = self._work[RequestClass.LONG] / total if total else 0.0
        return min(num - 1, max(floor, round(share * num)))

    def _prefill_role(self, request_class: RequestClass) -> InstanceRole:
        if request_class is RequestClass.SHORT:
            return _GENERAL
        if self._state.census.count(_RESERVED) == 0:
            return _GENERAL
        return _RESERVED

    def _plan(self, now_s: float, out: list[Action]) -> None:
        if self._adaptive:
            self._resize()
        while (req := self._head(RequestClass.SHORT)) is not None:
            if not self._place_short(req, now_s, out, SHORT_SLOTS, decode_in_place=True):
                if not self._reject_if_never_fits(req, out):
                    break
        while (req := self._head(RequestClass.LONG)) is not None:
            role = self._prefill_role(RequestClass.LONG)
            if not self._place_long(req, now_s, out, role):
                if not self._reject_if_never_fits(req, out):
                    return

    def _resize(self) -> None:
        """Move empty instances between the roles toward `target_reserved`."""
        st = self._state
        target = self.target_reserved()
        while st.census.count(_RESERVED) != target:
            grow = st.census.count(_RESERVED) < target
            src, dst = (_GENERAL, _RESERVED) if grow else (_RESERVED, _GENERAL)
            inst = st.pool.best(src, Slot.OPEN)
            if inst is None or st.ledger.used(inst.instance_id) or inst.decoding:
                return  # the emptiest one is busy: none of that role is empty now
            st.change_role(inst, dst)
