"""`distserve`: static prefill/decode disaggregation (DistServe / Splitwise / Dynamo style).

A fixed split of the instances: `distserve_decode_instances` of them (by default the
`distserve_decode_gpu_fraction` share of GPUs, 1/16, at least one instance) only decode, with
the SHORT_DECODE role (here it decodes both classes); the rest only prefill. DistServe picks the
split per model and load with a placement search; `bench/paper_eval.py` does the same by
sweeping `distserve_decode_instances` from 1 to all but one.

Prefill instances serve one first-come-first-served queue for every length (head-of-line order,
as DistServe's FCFS prefill scheduler): a prompt goes to the open prefill instance with the most
free KV. Every request's KV is then transferred to the decode instance with the most free KV
that holds prompt + output, and it decodes there in continuous batches: a prefill instance never
decodes. The one exception is a request that needs SP (which DistServe could not serve at all):
one that no single decode instance can hold (prompt + output above its KV), or whose prompt no
single prefill instance can hold. It prefills on the fewest open prefill instances that hold it
and decodes on that SP group, as in `fifo`.
"""

from __future__ import annotations

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.config import SchedulerConfig
from controlplane.core.records import RequestRecord, Slot
from controlplane.core.roles import RoleCensus, RolePlan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, InstanceSpec

_DECODE = InstanceRole.SHORT_DECODE
_PREFILL = InstanceRole.GENERAL


class DistServePolicy(BasePolicy):
    """Prefill instances (FCFS) and decode instances; every KV moves from one to the other."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, distserve_plan(config))

    def _plan(self, now_s: float, out: list[Action]) -> None:
        while (req := self._oldest()) is not None:
            if self._decodes_on_prefill_group(req):
                placed = self._place_long(req, now_s, out, _PREFILL)
            else:  # one prefill instance: its KV moves to one decode instance whole
                slots = (Slot.OPEN,)
                placed = self._place_short(req, now_s, out, slots, decode_in_place=False)
            if not placed and not self._reject_if_never_fits(req, out):
                return  # head-of-line: nothing overtakes the oldest request

    def _decodes_on_prefill_group(self, req: RequestRecord) -> bool:
        """True when `req` needs an SP group of prefill instances: no decode instance holds its
        KV, or no single prefill instance holds its prompt (it would wait for one forever)."""
        census = self._state.census
        decoders, prefillers = census.capacities(_DECODE), census.capacities(_PREFILL)
        if not decoders or decoders[-1] < req.spec.total_tokens:
            return True
        return not prefillers or prefillers[-1] < req.spec.prompt_tokens


def distserve_plan(config: SchedulerConfig) -> RolePlan:
    """Decode role up to `distserve_decode_instances`, or the GPU fraction (at least one
    instance); never the first instance up."""

    def assign(spec: InstanceSpec, census: RoleCensus) -> InstanceRole:
        if spec.role is _DECODE:
            return _DECODE
        if census.count(_PREFILL) == 0:
            return _PREFILL
        wanted = config.distserve_decode_instances
        if wanted is not None:
            decode = census.count(_DECODE) < wanted
        else:
            total_gpus = sum(census.num_gpus.values()) + spec.tp
            decode_gpus = census.num_gpus.get(_DECODE, 0) + spec.tp
            share = config.distserve_decode_gpu_fraction * total_gpus
            decode = decode_gpus <= max(spec.tp, share + 1e-9)  # one decode instance at least
        return _DECODE if decode else _PREFILL

    return assign
