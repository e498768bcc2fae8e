"""PecSched's short-decode pool: its size, its batch, and the slack it lends to prefills.

`ShortDecodePool` owns what the policy learns about short-decode (SHORT_DECODE) instances: the
batch one instance decodes within `short_tbt_slo_s` (`DecodeBatchEstimator`, fed by the
decodes that start and end there and by the prefills colocated there), and the most members
seen at once. From that it
- sizes the pool by demand (`balance`): `decoders_needed()` members, never fewer than one;
- places a short prefill inside a decoder's iterations (`colocate_short`), priced so each
  iteration stays within the TBT target;
- lends a decoder's slack to a long request no general group can take (`lend_to_long`).
A decoder keeps its role while it lends; it changes `ClusterState` only through its methods
(change_role, start_prefill).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from controlplane.core.actions import Action
from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.decode_slo import DecodeBatchEstimator
from controlplane.core.events import (
    Event,
    KVTransferDone,
    PrefillDone,
    RequestCancelled,
    RequestFailed,
    RequestFinished,
)
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.state import ClusterState
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_GENERAL = InstanceRole.GENERAL
_DECODE = InstanceRole.SHORT_DECODE
_SHORT = RequestClass.SHORT
# states of a short that holds, or will soon need, a place on a short-decode instance
_DECODE_BOUND = (RequestState.PREFILLING, RequestState.TRANSFERRING_KV, RequestState.DECODING)
_DECODERS_TRIED = 4  # short-decode instances examined per colocation attempt
# most iterations a short prefill colocated on a decoder may take (each within the TBT target:
# under a second at 0.1 s); a longer one goes to a long decode's instance or a preemption
_MAX_COLOCATED_ITERATIONS = 8


class ShortDecodePool:
    """The short-decode instances: demand-sized, batch-limited, their slack lent out."""

    def __init__(self, config: SchedulerConfig, state: ClusterState) -> None:
        self._config = config
        self._state = state
        self._peak = 0  # most SHORT_DECODE instances seen at once
        self._batch = DecodeBatchEstimator(config.short_tbt_slo_s, config.max_decode_batch)
        # shorts colocated on a decoder: request -> (start s, iterations, decoder batch then)
        self._colocated: dict[str, tuple[float, int, int]] = {}

    def observe(self, event: Event) -> None:
        """Learn from an event already applied to the state: the TBT of shorts decoding on
        short-decode instances and the cost of prefills colocated there."""
        if isinstance(event, RequestCancelled | RequestFailed):
            self._colocated.pop(event.request_id, None)
            self._batch.forget(event.request_id)
        elif isinstance(event, KVTransferDone | PrefillDone | RequestFinished):
            if isinstance(event, PrefillDone):
                self._learn_colocation(event)
            self._learn_decode(event)

    def _learn_decode(self, event: KVTransferDone | PrefillDone | RequestFinished) -> None:
        """A short's decode on a short-decode instance starts (KV arrived, or colocated prefill
        done) or ends (finished): feed the TBT estimator."""
        st = self._state
        req = st.requests.get(event.request_id)
        if req is None or req.request_class is not _SHORT or not req.decode_ids:
            return  # (a failed transfer has no decode place either)
        inst = st.instances.get(req.decode_ids[0])
        if inst is None or inst.role is not _DECODE:
            return
        if isinstance(event, RequestFinished):  # it has left the batch already
            batch = len(inst.decoding) + 1
            self._batch.decode_ended(req.request_id, event.at_s, req.output_tokens, batch)
        else:
            self._batch.decode_started(req.request_id, event.at_s, len(inst.decoding))

    def _learn_colocation(self, event: PrefillDone) -> None:
        """A short colocated on a decoder finished its prefill: price its iterations."""
        started = self._colocated.pop(event.request_id, None)
        req = self._state.requests.get(event.request_id)
        if started is None or req is None:
            return
        start_s, iterations, batch = started
        self._batch.colocated_prefill_ran(
            event.at_s - start_s, req.spec.prompt_tokens, iterations, batch
        )

    def batch_limit(self) -> int:
        """Shorts one short-decode instance takes: the learned batch within the TBT target."""
        return self._batch.batch_limit()

    def decodes_in_place(self, req: RequestRecord) -> bool:
        """Whether short `req` decodes where it prefills: without disaggregation, or when no
        short-decode instance can ever hold it."""
        if not self._config.disaggregation:
            return True
        decoders = self._state.census.capacities(_DECODE)
        return not decoders or decoders[-1] < req.spec.total_tokens

    def balance(
        self,
        now_s: float,
        out: list[Action],
        place_transfers: Callable[[float, list[Action]], None],
    ) -> None:
        """Demand-sized short-decode pool: `decoders_needed()` instances, never fewer than one
        (a pool configured empty stays empty; with no GENERAL instance left, an empty member
        turns GENERAL). Empty members beyond that go back to GENERAL (none while a transfer
        waits); empty GENERAL instances join while fewer are there or a transfer waits for a
        place (never the last GENERAL one), `place_transfers` running after each joins."""
        st = self._state
        count = st.census.count(_DECODE)
        self._peak = max(self._peak, count)
        if self._peak == 0:
            return
        needed = self.decoders_needed()
        if st.census.count(_GENERAL) == 0:
            needed = 0  # a decoder alone can prefill nothing: one turns GENERAL once empty
        while count > needed and not st.transfer_wait:
            emptiest = st.pool.best(_DECODE, Slot.OPEN)
            if emptiest is None or not self._is_empty(emptiest):
                break
            st.change_role(emptiest, _GENERAL)
            count -= 1
        while (count < needed or st.transfer_wait) and st.census.count(_GENERAL) > 1:
            candidate = st.pool.best(_GENERAL, Slot.OPEN)
            if candidate is None or not self._is_empty(candidate):
                break
            st.change_role(candidate, _DECODE)
            count += 1
            place_transfers(now_s, out)

    def decoders_needed(self) -> int:
        """Short-decode instances the shorts now prefilling, transferring or decoding need at
        the batch that meets the TBT target (at least one)."""
        counts = self._state.counts
        bound = sum(counts[(_SHORT, s)] for s in _DECODE_BOUND)
        return max(1, -(-bound // self._batch.batch_limit()))

    def _is_empty(self, inst: InstanceRecord) -> bool:
        return not inst.decoding and self._state.ledger.used(inst.instance_id) == 0

    def colocate_short(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """With colocation and disaggregation, prefill `req` inside the decode iterations of a
        short-decode instance whose batch is below the TBT target's, then decode it there:
        decoder slack serves short prefills before any long request is slowed. Its budget a
        step (at most `colocation_budget_tokens`) keeps each iteration within the TBT target,
        priced by `DecodeBatchEstimator.colocation_budget`; a decoder where the prefill would
        need more than `_MAX_COLOCATED_ITERATIONS` steps at that budget is passed over. One
        colocated prefill per decoder at a time."""
        st = self._state
        estimator = self._batch
        limit = estimator.batch_limit()
        need = req.spec.total_tokens
        prompt = req.spec.prompt_tokens
        for inst in self._open_to(req, now_s, self._config.short_decode_colocation):
            batch = len(inst.decoding)
            if batch >= limit or not st.ledger.can_allocate(inst.instance_id, need):
                continue
            budget = estimator.colocation_budget(batch, self._config.colocation_budget_tokens)
            if budget < 1 or budget * _MAX_COLOCATED_ITERATIONS < prompt:
                continue
            reason = (
                f"colocated on short-decode instance {inst.instance_id} ({budget} tokens a step)"
            )
            out.append(self._colocate(req, inst, budget, reason, now_s))
            self._colocated[req.request_id] = (now_s, -(-prompt // budget), batch)
            return True
        return False

    def lend_to_long(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """Prefill a long request no general group can take inside a short-decode instance's
        iterations, a small budget a step (chunk_budget_token_pairs / prompt / 16 tokens, so
        a step costs about one short colocation's), then decode it there: decoder slack left
        by the TBT target goes to long work. Only on a decoder with no long request on it,
        a batch below half the TBT target's, no prefill in flight, and half its KV still free
        once the long holds its own (shorts keep room); such a long is never paused."""
        cfg, st = self._config, self._state
        limit = self._batch.batch_limit()
        need = req.spec.total_tokens
        for inst in self._open_to(req, now_s, cfg.lend_decoder_to_longs):
            free = st.ledger.free_tokens(inst.instance_id)
            if (
                inst.num_long_decoding == 0
                and 2 * len(inst.decoding) < limit
                and free - need >= inst.spec.kv_capacity_tokens // 2
            ):
                budget_pairs = cfg.chunk_budget_token_pairs or cfg.chunk_tokens**2
                budget = max(16, budget_pairs // max(1, req.spec.prompt_tokens) // 16)
                reason = f"lent short-decode instance {inst.instance_id} ({budget} tokens a step)"
                out.append(self._colocate(req, inst, budget, reason, now_s))
                return True
        return False

    def _colocate(
        self, req: RequestRecord, inst: InstanceRecord, budget: int, reason: str, now_s: float
    ) -> Action:
        """Prefill `req` on the decoder `inst`, `budget` prompt tokens per step beside its
        decodes, and decode it there."""
        return self._state.start_prefill(
            req,
            [inst],
            decode_in_place=True,
            now_s=now_s,
            reason=reason,
            colocate=True,
            colocate_budget_tokens=budget,
        )

    def _open_to(self, req: RequestRecord, now_s: float, switch: bool) -> Iterator[InstanceRecord]:
        """The first `_DECODERS_TRIED` open short-decode instances that may take `req` as a
        colocated prefill: `switch` on, with disaggregation and colocation; no prefill in
        flight there, and no recent refusal of `req`. Callers add their own capacity rules."""
        cfg, st = self._config, self._state
        if not (
            switch and cfg.disaggregation and cfg.long_decode_sharing is LongDecodeSharing.COLOCATE
        ):
            return
        for inst in st.pool.top(_DECODE, Slot.OPEN, _DECODERS_TRIED):
            if inst.prefill_id is None and not (
                req.refusals and st.refused(req, inst.instance_id, now_s)
            ):
                yield inst
