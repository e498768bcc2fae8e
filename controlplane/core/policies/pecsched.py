"""`pecsched` and its ablations: shorts first, colocation, preemption at chunk boundaries.

Each schedule():
0. Short-decode pool sized by demand (`short_decode_elastic`, with `disaggregation`): it
   keeps `_decoders_needed()` instances = the shorts now prefilling, transferring KV or
   decoding, divided by the batch one instance decodes within `short_tbt_slo_s` (learned from
   finished decodes, `DecodeBatchEstimator`), and never fewer than one: empty members beyond
   that go back to GENERAL, empty GENERAL instances join while fewer are there or a transfer
   waits for a place. A decoder takes no more shorts than that batch.
1. Starvation bound: a paused long prefill whose total pause time reached `max_pause_s` (or,
   with the anti-thrash bound `max_preemptions_per_long`, that was paused that many times) is
   protected: its group takes no new short work until it resumes, and it is paused again
   only for one short prefill after every `protected_duty_cycle_chunks` chunks it runs
   (None: never), its group held for it meanwhile.
2. Aging (off by default): once the oldest long request has waited `long_aging_s`, it goes
   before any short; when it does not fit, it holds open instances as they appear (shorts
   cannot take them) until the held ones can take it. Shorts keep every other instance.
3. Short requests, first-come-first-served (higher `priority` first), each on the first of:
   an open general instance (most free KV); colocated on a short-decode instance whose batch
   is below the TBT target's, decoding there (`short_decode_colocation`; its prompt tokens a
   step priced so each iteration stays within `short_tbt_slo_s`, none when that takes more
   than `_MAX_COLOCATED_ITERATIONS` steps); an instance
   decoding a long request (Colocate with a per-iteration prefill budget, or a stalling
   StartPrefill when `long_decode_sharing` is STALL: the /CoL ablation, which also turns off
   colocation on decoders); an instance whose long prefill is already paused; else, with
   `preemption` and once the short has waited `short_preempt_delay_s` (a decoder or an
   instance may free up first; earlier with `short_preempt_early`: at once in a burst, when
   more shorts are queued than short prefills are running, else a victim whose chunk ends
   before the delay would), pause a running long prefill and take one of its instances:
   among the first `_MAX_VICTIMS_TRIED` running longs in order (smallest SP group, least
   paused so far, newest; never one on its last chunk), the one whose chunk in flight should
   end first (its last chunk's length, observed), so the short waits least. With
   `disaggregation` a short prefilled on a general instance decodes on the most loaded
   short-decode instance with room after a KV transfer (bin packing lets spare members empty
   out); else where it prefilled.
4. Resume paused long prefills whose whole group is free (protected ones first).
5. Long requests, first-come-first-served: the smallest SP group of open general instances
   whose free KV holds prompt + output (larger if `target_prefill_tokens_per_instance` asks),
   widened with `widen_sp_when_idle` to the long's share of the open general instances (the
   queued longs share them; one plus one per running short prefill stay open for shorts), up
   to `max_sp_degree`; prefilled in chunks (`prefill_chunk_tokens`, at the token-pair budget
   that makes a chunk take `long_chunk_target_s` on the group's instance class, learned from
   the chunk times observed: `ChunkTimeEstimator`; a widened group's chunk is the one of the
   fewest instances that hold its KV, so its members' chunks end sooner),
   decoding in place on the same group. Shorts take widened groups back by preemption at chunk
   boundaries. A long no
   group can take is lent a short-decode instance's slack (`lend_decoder_to_longs`): it
   prefills inside that decoder's iterations at a small budget a step and decodes there,
   only while the decoder's batch is below half the TBT target's (never paused; the decoder
   keeps its role, so shorts keep decoding there).

The ablations are this class with one switch of `SchedulerConfig` flipped (see registry.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy, rank_order
from controlplane.core.chunk_timing import ChunkClass, ChunkTimeEstimator
from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.decode_slo import DecodeBatchEstimator
from controlplane.core.events import (
    Event,
    KVTransferDone,
    PrefillChunkDone,
    PrefillDone,
    RequestCancelled,
    RequestFailed,
    RequestFinished,
)
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.roles import all_general, short_decode_plan
from controlplane.core.state import VictimEntry
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_GENERAL = InstanceRole.GENERAL
_DECODE = InstanceRole.SHORT_DECODE
_SHORT, _LONG = RequestClass.SHORT, RequestClass.LONG
# states of a short that holds, or will soon need, a place on a short-decode instance
_DECODE_BOUND = (RequestState.PREFILLING, RequestState.TRANSFERRING_KV, RequestState.DECODING)
# running long prefills examined per preemption attempt (8 -> 32: short p99 queueing on the
# long20-bursty and Azure Mistral-7B points of bench/paper_eval.py -35 to -50%, every seed)
_MAX_VICTIMS_TRIED = 32
_DECODERS_TRIED = 4  # short-decode instances examined per colocation attempt
# most iterations a short prefill colocated on a decoder may take (each within the TBT target:
# under a second at 0.1 s); a longer one goes to a long decode's instance or a preemption
_MAX_COLOCATED_ITERATIONS = 8
_WIDEN_SCAN = 64  # most open instances counted (and kept for shorts) when widening an SP group


def kv_base_degree(free_tokens: Sequence[int], need_tokens: int) -> int:
    """The fewest of a group's instances (`free_tokens`: their free KV, most first) whose free
    KV holds `need_tokens`; the whole group when none do."""
    held = 0
    for degree, free in enumerate(free_tokens, start=1):
        held += free
        if held >= need_tokens:
            return degree
    return len(free_tokens)


class _ChunkMark(NamedTuple):
    """A long prefill's chunk clock."""

    started_s: float  # when its chunk in flight started
    last_s: float  # how long its last chunk ran, start to end (NaN until one did)


class PecSchedPolicy(BasePolicy):
    """PecSched; the config's switches give the ablations."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        # Without disaggregation no instance is set aside for short decode.
        plan = short_decode_plan(config) if config.disaggregation else all_general
        super().__init__(name, config, rng, plan)
        slots = [Slot.OPEN]
        if config.long_decode_sharing is not LongDecodeSharing.NEVER:
            slots.append(Slot.LONG_DECODE)
        slots.append(Slot.PAUSED_HOST)
        self._short_slots = tuple(slots)
        self._aged_holder: str | None = None  # the aged long holding instances, if any
        self._decode_pool_peak = 0  # most SHORT_DECODE instances seen at once
        self._decode_batch = DecodeBatchEstimator(config.short_tbt_slo_s, config.max_decode_batch)
        # long prefills' chunk clocks, to pause the one nearest a chunk boundary
        self._chunk_marks: dict[str, _ChunkMark] = {}
        budget, target = config.chunk_budget_token_pairs, config.long_chunk_target_s
        self._chunk_timing = (
            None if budget is None or target is None else ChunkTimeEstimator(target, budget)
        )
        # shorts colocated on a decoder: request -> (start s, iterations, decoder batch then)
        self._colocated: dict[str, tuple[float, int, int]] = {}

    def observe(self, events: Sequence[Event]) -> None:
        """Apply events, then learn from them: long prefills' chunk clocks (`_chunk_marks`)
        and the TBT of shorts decoding on short-decode instances (`_decode_batch`)."""
        super().observe(events)
        for event in events:
            if isinstance(event, PrefillChunkDone):
                mark = self._chunk_marks.get(event.request_id)
                last_s = math.nan if mark is None else event.at_s - mark.started_s
                self._learn_chunk(event, last_s)
                self._chunk_marks[event.request_id] = _ChunkMark(event.at_s, last_s)
            elif isinstance(event, RequestCancelled | RequestFailed):
                self._chunk_marks.pop(event.request_id, None)
                self._colocated.pop(event.request_id, None)
                self._decode_batch.forget(event.request_id)
            elif isinstance(event, KVTransferDone | PrefillDone | RequestFinished):
                self._chunk_marks.pop(event.request_id, None)
                if isinstance(event, PrefillDone):
                    self._learn_colocation(event)
                self._learn_decode(event)

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
            self._decode_batch.decode_ended(req.request_id, event.at_s, req.output_tokens, batch)
        else:
            self._decode_batch.decode_started(req.request_id, event.at_s, len(inst.decoding))

    def _learn_colocation(self, event: PrefillDone) -> None:
        """A short colocated on a decoder finished its prefill: price its iterations."""
        started = self._colocated.pop(event.request_id, None)
        req = self._state.requests.get(event.request_id)
        if started is None or req is None:
            return
        start_s, iterations, batch = started
        self._decode_batch.colocated_prefill_ran(
            event.at_s - start_s, req.spec.prompt_tokens, iterations, batch
        )

    def _decode_batch_limit(self) -> int:
        """Shorts one short-decode instance takes: the learned batch within the TBT target."""
        return self._decode_batch.batch_limit()

    def _plan(self, now_s: float, out: list[Action]) -> None:
        cfg = self._config
        if cfg.disaggregation and cfg.short_decode_elastic:
            self._balance_short_decode(now_s, out)
        self._protect_starving(now_s)
        aged_waits = self._serve_aged_longs(now_s, out)
        self._place_shorts(now_s, out)
        self._resume_paused(now_s, out)
        if not aged_waits:  # first come, first served among longs: none overtakes an aged one
            self._place_longs(now_s, out)

    def _place_longs(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(_LONG)) is not None:
            if self._place_long(req, now_s, out, _GENERAL):
                continue
            if self._lend_decoder_to_long(req, now_s, out):
                continue
            if not self._reject_if_never_fits(req, out):
                return

    def _lend_decoder_to_long(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """Prefill a long request no general group can take inside a short-decode instance's
        iterations, a small budget a step (chunk_budget_token_pairs / prompt / 16 tokens, so
        a step costs about one short colocation's), then decode it there: decoder slack left
        by the TBT target goes to long work. Only on a decoder with no long request on it,
        a batch below half the TBT target's, no prefill in flight, and half its KV still free
        once the long holds its own (shorts keep room); such a long is never paused."""
        cfg, st = self._config, self._state
        limit = self._decode_batch.batch_limit()
        need = req.spec.total_tokens
        for inst in self._decoders_open_to(req, now_s, cfg.lend_decoder_to_longs):
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

    def _balance_short_decode(self, now_s: float, out: list[Action]) -> None:
        """Demand-sized short-decode pool: `_decoders_needed()` instances, never fewer than one
        (a pool configured empty stays empty; with no GENERAL instance left, an empty member
        turns GENERAL). Empty members beyond that go back to GENERAL (none while a transfer
        waits); empty GENERAL instances join while fewer are there or a transfer waits for a
        place (never the last GENERAL one)."""
        st = self._state
        count = st.census.count(_DECODE)
        self._decode_pool_peak = max(self._decode_pool_peak, count)
        if self._decode_pool_peak == 0:
            return
        needed = self._decoders_needed()
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
            self._place_transfers(now_s, out)

    def _decoders_needed(self) -> int:
        """Short-decode instances the shorts now prefilling, transferring or decoding need at
        the batch that meets the TBT target (at least one)."""
        counts = self._state.counts
        bound = sum(counts[(_SHORT, s)] for s in _DECODE_BOUND)
        return max(1, -(-bound // self._decode_batch.batch_limit()))

    def _wanted_degree(self, req: RequestRecord) -> int:
        """With `widen_sp_when_idle`, a long prefill also takes its share of the open general
        instances (shared among the queued longs), leaving one plus one per running short
        prefill open for arriving shorts (both counts capped at `_WIDEN_SCAN`, so a placement
        stays O(log n) at any cluster size)."""
        wanted = super()._wanted_degree(req)
        cfg, st = self._config, self._state
        if not cfg.widen_sp_when_idle or req.request_class is not _LONG:
            return wanted
        reserve = min(_WIDEN_SCAN, 1 + st.counts[(_SHORT, RequestState.PREFILLING)])
        queued = max(1, st.counts[(_LONG, RequestState.QUEUED)])
        limit = min(cfg.max_sp_degree * queued, _WIDEN_SCAN) + reserve
        share = (len(st.pool.top(_GENERAL, Slot.OPEN, limit)) - reserve) // queued
        return max(wanted, min(cfg.max_sp_degree, share))

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

    def _is_empty(self, inst: InstanceRecord) -> bool:
        st = self._state
        return not inst.decoding and st.ledger.used(inst.instance_id) == 0

    def _next_timer_s(self, now_s: float) -> float:
        st, aging_s = self._state, self._config.long_aging_s
        wake_s = st.next_starvation_s()
        oldest = self._head(_LONG)
        if aging_s is not None and oldest is not None:
            aged_s = oldest.spec.arrival_s + aging_s
            if aged_s > now_s:
                wake_s = min(wake_s, aged_s)
        short = self._head(_SHORT)
        if short is not None and self._config.preemption:
            preempt_s = short.spec.arrival_s + self._config.short_preempt_delay_s
            if preempt_s > now_s:
                wake_s = min(wake_s, preempt_s)
        return wake_s

    def _place_shorts(self, now_s: float, out: list[Action]) -> None:
        first, rest = self._short_slots[:1], self._short_slots[1:]
        while (req := self._head(_SHORT)) is not None:
            in_place = self._short_decodes_in_place(req)
            if self._place_short(req, now_s, out, first, decode_in_place=in_place):
                continue
            if self._colocate_on_decoder(req, now_s, out):
                continue
            if self._place_short(req, now_s, out, rest, decode_in_place=in_place):
                continue
            ends_by_s = self._preempt_deadline_s(req, now_s)
            if ends_by_s is not None and self._preempt_for(req, now_s, out, in_place, ends_by_s):
                continue
            if not self._reject_if_never_fits(req, out):
                return

    def _preempt_deadline_s(self, req: RequestRecord, now_s: float) -> float | None:
        """Latest end of a victim's chunk in flight at which `req` may pause it now (inf: any
        victim; None: no preemption). With `preemption`: any once `req` has waited
        `short_preempt_delay_s` (a decoder's colocated prefill or an open instance may free up
        first). Before that, with `short_preempt_early`: any when more shorts are queued than
        short prefills are running (each of those frees an instance soon, so waiting could
        place only some: a burst); else one whose chunk ends before the delay would (waiting
        would only miss that boundary)."""
        cfg = self._config
        if not cfg.preemption:
            return None
        delay_ends_s = req.spec.arrival_s + cfg.short_preempt_delay_s
        if now_s >= delay_ends_s:
            return math.inf
        if not cfg.short_preempt_early:
            return None
        counts = self._state.counts
        if counts[(_SHORT, RequestState.QUEUED)] > counts[(_SHORT, RequestState.PREFILLING)]:
            return math.inf
        return delay_ends_s

    def _colocate_on_decoder(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """With colocation and disaggregation, prefill `req` inside the decode iterations of a
        short-decode instance whose batch is below the TBT target's, then decode it there:
        decoder slack serves short prefills before any long request is slowed. Its budget a
        step (at most `colocation_budget_tokens`) keeps each iteration within the TBT target,
        priced by `DecodeBatchEstimator.colocation_budget`; a decoder where the prefill would
        need more than `_MAX_COLOCATED_ITERATIONS` steps at that budget is passed over. One
        colocated prefill per decoder at a time."""
        st = self._state
        estimator = self._decode_batch
        limit = estimator.batch_limit()
        need = req.spec.total_tokens
        prompt = req.spec.prompt_tokens
        for inst in self._decoders_open_to(req, now_s, self._config.short_decode_colocation):
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

    def _decoders_open_to(
        self, req: RequestRecord, now_s: float, switch: bool
    ) -> Iterator[InstanceRecord]:
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

    def _serve_aged_longs(self, now_s: float, out: list[Action]) -> bool:
        """Start long requests queued for `long_aging_s` or more, before any short.

        An aged long that does not fit the open instances holds them, one by one as they
        become open, until the held ones can take it: shorts keep every other instance.
        Returns True when an aged long still waits.
        """
        st, cfg = self._state, self._config
        while (req := self._head(_LONG)) is not None:
            if cfg.long_aging_s is None or now_s - req.spec.arrival_s < cfg.long_aging_s:
                return False
            self._hand_aged_holds_to(req)
            held = [st.instances[i] for i in req.held_ids if i in st.instances]
            free_tokens = sum(st.ledger.free_tokens(i.instance_id) for i in held)
            wanted = self._wanted_degree(req)
            need = req.spec.total_tokens
            while (free_tokens < need or len(held) < wanted) and len(held) < cfg.max_sp_degree:
                inst = st.pool.best(_GENERAL, Slot.OPEN)
                if inst is None:
                    break
                st.hold(req, inst)
                held.append(inst)
                free_tokens += st.ledger.free_tokens(inst.instance_id)
            if free_tokens < need or len(held) < wanted:
                if len(held) >= cfg.max_sp_degree:
                    st.release_holds(req)  # these can never hold it: gather afresh next time
                if self._reject_if_never_fits(req, out):
                    continue
                return True
            group = rank_order(st.release_holds(req))
            reason = f"aged {now_s - req.spec.arrival_s:.1f} s: SP group of {len(group)} held"
            out.append(
                st.start_prefill(req, group, decode_in_place=True, now_s=now_s, reason=reason)
            )
        return False

    def _hand_aged_holds_to(self, head: RequestRecord) -> None:
        """Only the head of the long queue holds instances for an aged start: when another long
        became the head (a higher priority arrived), the former head's holds are released, so
        two aged longs never each hold part of what both need (a deadlock)."""
        holder = self._state.requests.get(self._aged_holder) if self._aged_holder else None
        if holder is not None and holder is not head and holder.state is RequestState.QUEUED:
            self._state.release_holds(holder)
        self._aged_holder = head.request_id

    def _short_decodes_in_place(self, req: RequestRecord) -> bool:
        if not self._config.disaggregation:
            return True
        decoders = self._state.census.capacities(InstanceRole.SHORT_DECODE)
        return not decoders or decoders[-1] < req.spec.total_tokens

    def _preempt_for(
        self, req: RequestRecord, now_s: float, out: list[Action], in_place: bool, ends_by_s: float
    ) -> bool:
        """Pause a running long prefill whose chunk in flight should end by `ends_by_s` and
        start `req` on one of its instances."""
        st = self._state
        need = req.spec.total_tokens if in_place else req.spec.prompt_tokens
        found = self._find_victim(req, need, now_s, ends_by_s)
        if found is None:
            return False
        victim, host = found
        out.append(st.pause(victim, now_s, f"make room for short request {req.request_id}"))
        bound = self._config.max_preemptions_per_long
        if bound is not None and victim.num_preemptions >= bound:
            st.protect(victim)  # anti-thrash: only the protected duty cycle pauses it again
        reason = f"preempted long request {victim.request_id} on {host.instance_id}"
        out.append(
            st.start_prefill(req, [host], decode_in_place=in_place, now_s=now_s, reason=reason)
        )
        return True

    def _find_victim(
        self, req: RequestRecord, need_tokens: int, now_s: float, ends_by_s: float
    ) -> tuple[RequestRecord, InstanceRecord] | None:
        """Among the first `_MAX_VICTIMS_TRIED` running long prefills of `running_longs`
        (smallest SP group, least paused, newest first) that may be paused and have an
        instance with room for `req`, the one whose chunk in flight should end first (none
        whose chunk should end after `ends_by_s`)."""
        st = self._state
        kept: list[VictimEntry] = []
        found: tuple[float, int, RequestRecord, InstanceRecord] | None = None
        while len(kept) < _MAX_VICTIMS_TRIED and (popped := st.pop_victim()) is not None:
            entry, victim = popped
            if (
                victim.chunks_done + 1 >= victim.chunks_total  # last chunk in flight
                or st.instances[victim.prefill_ids[0]].role is _DECODE  # colocated on a decoder
            ):
                continue  # never a victim again
            kept.append(entry)
            if not st.pause_due(victim):
                continue  # not before its duty cycle's chunks ran
            hosts = [
                st.instances[i]
                for i in victim.prefill_ids
                if not (req.refusals and st.refused(req, i, now_s))
            ]
            host = max(
                hosts,
                key=lambda inst: (st.ledger.free_tokens(inst.instance_id), inst.instance_id),
                default=None,
            )
            if host is None or not st.ledger.can_allocate(host.instance_id, need_tokens):
                continue
            boundary = (self._chunk_end_s(victim), len(kept), victim, host)
            if boundary[0] <= ends_by_s and (found is None or boundary[:2] < found[:2]):
                found = boundary
        for entry in kept:
            if found is None or entry.request_id != found[2].request_id:
                st.push_victim(entry)
        return None if found is None else (found[2], found[3])

    def _chunk_end_s(self, req: RequestRecord) -> float:
        """When `req`'s chunk in flight should end, from its last chunk's length (inf when
        no chunk ran start to end since it started)."""
        mark = self._chunk_marks.get(req.request_id)
        if mark is None or math.isnan(mark.last_s):
            return math.inf
        return mark.started_s + mark.last_s

    def _protect_starving(self, now_s: float) -> None:
        st = self._state
        for req in st.pop_starving(now_s):
            st.protect(req)

    def _resume_paused(self, now_s: float, out: list[Action]) -> None:
        st = self._state
        if not st.resumable:
            return
        candidates = sorted(
            (st.requests[r] for r in st.resumable if r in st.requests),
            key=lambda r: (not r.is_protected, r.seq),
        )
        st.resumable.clear()
        for req in candidates:
            if req.state is RequestState.PAUSED and st.group_is_free(req):
                why = "starvation bound reached" if req.is_protected else "group free again"
                out.append(st.resume(req, now_s, why))
                mark = self._chunk_marks.get(req.request_id)
                if mark is not None:
                    self._chunk_marks[req.request_id] = _ChunkMark(now_s, mark.last_s)
