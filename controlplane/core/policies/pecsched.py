"""`pecsched` and its ablations: shorts first, colocation, preemption at chunk boundaries.

Each schedule():
0. Short-decode pool sized by demand (`short_decode_elastic`, with `disaggregation`): it keeps
   `ShortDecodePool.decoders_needed()` instances = the shorts now prefilling, transferring KV or
   decoding, divided by the batch one instance decodes within `short_tbt_slo_s` (learned from
   finished decodes, `DecodeBatchEstimator`), and never fewer than one: empty members beyond
   that go back to GENERAL, empty GENERAL instances join while fewer are there or a transfer
   waits for a place. A decoder takes no more shorts than that batch.
1. Starvation bound: a paused long prefill whose total pause time reached `max_pause_s` (or,
   with the anti-thrash bound `max_preemptions_per_long`, that was paused that many times) is
   protected: its group takes no new short work until it resumes, and it is paused again only
   for one short prefill after every `protected_duty_cycle_chunks` chunks it runs (None: never),
   its group held for it meanwhile.
2. Aging (off by default): once the oldest long request has waited `long_aging_s`, it goes
   before any short; when it does not fit, it holds open instances as they appear (shorts cannot
   take them) until the held ones can take it. Shorts keep every other instance.
3. Short requests, first-come-first-served (higher `priority` first), each on the first of: an
   open general instance (most free KV); colocated on a short-decode instance whose batch is
   below the TBT target's, decoding there (`short_decode_colocation`; its prompt tokens a step
   priced so each iteration stays within `short_tbt_slo_s`, none when that takes more than
   `_MAX_COLOCATED_ITERATIONS` steps, pecsched_decoders.py); an instance decoding a long request
   (Colocate with a per-iteration prefill budget, or a stalling StartPrefill when
   `long_decode_sharing` is STALL: the /CoL ablation, which also turns off colocation on
   decoders); an instance whose long prefill is already paused; else, with `preemption` and once
   the short has waited `short_preempt_delay_s` (a decoder or an instance may free up first;
   earlier with `short_preempt_early`: at once in a burst, when more shorts are queued than
   short prefills are running, else a victim whose chunk ends before the delay would), pause a
   running long prefill and take one of its instances: among the first `_MAX_VICTIMS_TRIED`
   running longs in order (smallest SP group, least paused so far, newest; never one on its last
   chunk), the one whose chunk in flight should end first (its last chunk's length, observed),
   so the short waits least (pecsched_victims.py). With `disaggregation` a short prefilled on a
   general instance decodes on the most loaded short-decode instance with room after a KV
   transfer (bin packing lets spare members empty out); else where it prefilled.
4. Resume paused long prefills whose whole group is free (protected ones first).
5. Long requests, first-come-first-served: the smallest SP group of open general instances whose
   free KV holds prompt + output (larger if `target_prefill_tokens_per_instance` asks), widened
   with `widen_sp_when_idle` to the long's share of the open general instances (the queued longs
   share them; one plus one per running short prefill stay open for shorts), up to
   `max_sp_degree`; prefilled in chunks (`prefill_chunk_tokens`, at the token-pair budget that
   makes a chunk take `long_chunk_target_s` on the group's instance class, learned from the
   chunk times observed: `ChunkTimeEstimator`; a widened group's chunk is the one of the fewest
   instances that hold its KV, so its members' chunks end sooner), decoding in place on the same
   group. Shorts take widened groups back by preemption at chunk boundaries. A long no group can
   take is lent a short-decode instance's slack (`lend_decoder_to_longs`): it prefills inside
   that decoder's iterations at a small budget a step and decodes there, only while the
   decoder's batch is below half the TBT target's (never paused; the decoder keeps its role, so
   shorts keep decoding there).

The ablations are this class with one switch of `SchedulerConfig` flipped (see registry.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy
from controlplane.core.chunk_timing import ChunkClass, ChunkTimeEstimator
from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.events import Event, PrefillChunkDone
from controlplane.core.policies.pecsched_decoders import ShortDecodePool
from controlplane.core.policies.pecsched_starvation import (
    AgedLongs,
    protect_starving,
    resume_paused,
)
from controlplane.core.policies.pecsched_victims import ShortPreemption
from controlplane.core.policies.pecsched_widening import widened_degree
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.roles import all_general, short_decode_plan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass

_GENERAL = InstanceRole.GENERAL
_SHORT, _LONG = RequestClass.SHORT, RequestClass.LONG


def kv_base_degree(free_tokens: Sequence[int], need_tokens: int) -> int:
    """The fewest of a group's instances (`free_tokens`: their free KV, most first) whose free
    KV holds `need_tokens`; the whole group when none do."""
    held = 0
    for degree, free in enumerate(free_tokens, start=1):
        held += free
        if held >= need_tokens:
            return degree
    return len(free_tokens)


class PecSchedPolicy(BasePolicy):
    """PecSched; the config's switches give the ablations. The order of its rules is here;
    each rule's mechanism is in a part: the short-decode pool (pecsched_decoders.py), the
    starvation bound and aging (pecsched_starvation.py), preemption (pecsched_victims.py)
    and SP widening (pecsched_widening.py)."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        # Without disaggregation no instance is set aside for short decode.
        plan = short_decode_plan(config) if config.disaggregation else all_general
        super().__init__(name, config, rng, plan)
        slots = [Slot.OPEN]
        if config.long_decode_sharing is not LongDecodeSharing.NEVER:
            slots.append(Slot.LONG_DECODE)
        slots.append(Slot.PAUSED_HOST)
        self._short_slots = tuple(slots)
        self._decoders = ShortDecodePool(config, self._state)
        self._aged = AgedLongs(config, self._state)
        self._preemption = ShortPreemption(config, self._state)
        budget, target = config.chunk_budget_token_pairs, config.long_chunk_target_s
        self._chunk_timing = (
            None if budget is None or target is None else ChunkTimeEstimator(target, budget)
        )

    def observe(self, events: Sequence[Event]) -> None:
        """Apply events, then learn from them: long prefills' chunk clocks (`ShortPreemption`),
        their chunk times (`ChunkTimeEstimator`) and the TBT of shorts decoding on short-decode
        instances (`ShortDecodePool`)."""
        super().observe(events)
        for event in events:
            chunk_s = self._preemption.observe(event)
            if isinstance(event, PrefillChunkDone):
                self._learn_chunk(event, chunk_s)
            self._decoders.observe(event)

    def _learn_chunk(self, event: PrefillChunkDone, seconds: float) -> None:
        """A long prefill's chunk on general instances ran `seconds` (NaN: unknown): feed
        the chunk-time estimator of their class."""
        req = self._state.requests.get(event.request_id)
        if self._chunk_timing is None or req is None or not req.prefill_ids:
            return
        inst = self._state.instances.get(req.prefill_ids[0])
        if inst is not None and req.request_class is _LONG and inst.role is _GENERAL:
            spec = inst.spec
            self._chunk_timing.prefill_chunk_ran(
                ChunkClass(spec.tp, spec.kv_capacity_tokens), seconds,
                req.spec.prompt_tokens, req.chunks_total, event.chunk_index, len(req.prefill_ids),
            )  # fmt: skip

    def _decode_batch_limit(self) -> int:
        """Shorts one short-decode instance takes: the learned batch within the TBT target."""
        return self._decoders.batch_limit()

    def _plan(self, now_s: float, out: list[Action]) -> None:
        cfg = self._config
        if cfg.disaggregation and cfg.short_decode_elastic:
            self._decoders.balance(now_s, out, self._place_transfers)
        protect_starving(self._state, now_s)
        aged_waits = self._serve_aged_longs(now_s, out)
        self._place_shorts(now_s, out)
        for request_id in resume_paused(self._state, now_s, out):
            self._preemption.resumed(request_id, now_s)
        if not aged_waits:  # first come, first served among longs: none overtakes an aged one
            self._place_longs(now_s, out)

    def _serve_aged_longs(self, now_s: float, out: list[Action]) -> bool:
        """Start long requests queued for `long_aging_s` or more, before any short, each on
        the group `AgedLongs.gather` held for it. Returns True when an aged long still waits."""
        while (req := self._head(_LONG)) is not None:
            if not self._aged.is_aged(req, now_s):
                return False
            group = self._aged.gather(req, self._wanted_degree)
            if group is None:
                if self._reject_if_never_fits(req, out):
                    continue
                return True
            reason = f"aged {now_s - req.spec.arrival_s:.1f} s: SP group of {len(group)} held"
            out.append(
                self._state.start_prefill(
                    req, group, decode_in_place=True, now_s=now_s, reason=reason
                )
            )
        return False

    def _place_shorts(self, now_s: float, out: list[Action]) -> None:
        first, rest = self._short_slots[:1], self._short_slots[1:]
        while (req := self._head(_SHORT)) is not None:
            in_place = self._decoders.decodes_in_place(req)
            if self._place_short(req, now_s, out, first, decode_in_place=in_place):
                continue
            if self._decoders.colocate_short(req, now_s, out):
                continue
            if self._place_short(req, now_s, out, rest, decode_in_place=in_place):
                continue
            ends_by_s = self._preemption.deadline_s(req, now_s)
            if ends_by_s is not None and self._preemption.preempt_for(
                req, now_s, out, in_place, ends_by_s
            ):
                continue
            if not self._reject_if_never_fits(req, out):
                return

    def _place_longs(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(_LONG)) is not None:
            if self._place_long(req, now_s, out, _GENERAL):
                continue
            if self._decoders.lend_to_long(req, now_s, out):
                continue
            if not self._reject_if_never_fits(req, out):
                return

    def _wanted_degree(self, req: RequestRecord) -> int:
        """The base degree, widened over idle instances (`widened_degree`)."""
        wanted = super()._wanted_degree(req)
        return widened_degree(self._config, self._state, req, wanted)

    def _long_chunk_tokens(self, req: RequestRecord, group: Sequence[InstanceRecord]) -> int | None:
        """A group widened beyond the instances that hold `req`'s KV (`kv_base_degree`) gets
        the chunk of that base degree, not of its width: each member's chunk runs about
        width / base times shorter, so a short that preempts the group waits less for its
        boundary, for more chunks (measured: BENCHMARKS.md, "Short queueing on TP4 models at
        light load"). With `long_chunk_target_s`, at the token-pair budget learned for the
        group's instance class (`ChunkTimeEstimator`). None (the config's rule) for a group of
        its base size without a target."""
        st = self._state
        free = sorted((st.ledger.free_tokens(i.instance_id) for i in group), reverse=True)
        base = kv_base_degree(free, req.spec.total_tokens)
        timing, spec = self._chunk_timing, group[0].spec
        budget = (
            timing.budget_pairs(ChunkClass(spec.tp, spec.kv_capacity_tokens)) if timing else None
        )
        if base >= len(group) and budget is None:
            return None
        return self._config.prefill_chunk_tokens(req.spec.prompt_tokens, base, budget)

    def _next_timer_s(self, now_s: float) -> float:
        """The next starvation bound, the head long's aging, the head short's preemption."""
        return min(
            self._state.next_starvation_s(),
            self._aged.wake_s(self._head(_LONG), now_s),
            self._preemption.wake_s(self._head(_SHORT), now_s),
        )
