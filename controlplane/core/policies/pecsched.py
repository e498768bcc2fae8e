"""`pecsched` and its ablations: shorts first, colocation, preemption at chunk boundaries.

Each schedule():
0. Elastic short-decode pool (`short_decode_elastic`, with `disaggregation`): SHORT_DECODE
   instances that sit empty go back to GENERAL (one stays); while shorts wait for a decode
   place, empty GENERAL instances rejoin, up to the pool's peak (configured) size. Measured
   on the Azure trace (32 x A100, Mistral-7B): long JCT 632 -> 448 s, short p99 unchanged.
1. Starvation bound: a paused long prefill whose total pause time reached `max_pause_s` is
   protected: its group takes no new short work until it resumes, and it is paused again
   only for one short prefill after every `protected_duty_cycle_chunks` chunks it runs
   (None: never), its group held for it meanwhile.
2. Aging (off by default): once the oldest long request has waited `long_aging_s`, it goes
   before any short; when it does not fit, it holds open instances as they appear (shorts
   cannot take them) until the held ones can take it. Shorts keep every other instance.
3. Short requests, first-come-first-served (higher `priority` first), each on the first of:
   an open general instance (most free KV); an instance decoding a long request (Colocate with
   a per-iteration prefill budget, or a stalling StartPrefill when `long_decode_sharing` is
   STALL: the /CoL ablation); an instance whose long prefill is already paused; else, with
   `preemption`, pause a running long prefill (smallest SP group first, so the fewest
   instances wait for shorts; then least paused so far, newest; never one on its last
   chunk) and take one of its instances. With `disaggregation` the short decodes on the
   least-loaded SHORT_DECODE instance after a KV transfer; else where it prefilled.
4. Resume paused long prefills whose whole group is free (protected ones first).
5. Long requests, first-come-first-served: the smallest SP group of open general instances
   whose free KV holds prompt + output (larger if `target_prefill_tokens_per_instance` asks),
   prefilled in `chunk_tokens` chunks, decoding in place on the same group.

The ablations are this class with one switch of `SchedulerConfig` flipped (see registry.py).
"""

from __future__ import annotations

import heapq
import math

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy, rank_order
from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.roles import all_general, short_decode_plan
from controlplane.core.state import VictimEntry
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_GENERAL = InstanceRole.GENERAL
_DECODE = InstanceRole.SHORT_DECODE
_MAX_VICTIMS_TRIED = 8  # running long prefills examined per preemption attempt


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
        self._decode_pool_peak = 0  # most SHORT_DECODE instances seen at once
        # elastic pool: a long request still waited at the end of the last plan, so the last
        # short-decode instance is lent to GENERAL once empty (new shorts decode in place)
        self._lend_last_decoder = False

    def _plan(self, now_s: float, out: list[Action]) -> None:
        cfg = self._config
        elastic = cfg.disaggregation and cfg.short_decode_elastic
        if elastic:
            self._balance_short_decode(now_s, out)
        self._protect_starving(now_s)
        aged_waits = self._serve_aged_longs(now_s, out)
        self._place_shorts(now_s, out)
        self._resume_paused(now_s, out)
        if not aged_waits:  # first come, first served among longs: none overtakes an aged one
            self._place_longs(now_s, out)
        if elastic and cfg.lend_last_short_decoder:
            self._lend_last_decoder = self._head(RequestClass.LONG) is not None
            if self._lend_or_reclaim_last_decoder() and not aged_waits:
                self._place_longs(now_s, out)

    def _place_longs(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(RequestClass.LONG)) is not None:
            if not self._place_long(req, now_s, out, _GENERAL):
                if not self._reject_if_never_fits(req, out):
                    return

    def _balance_short_decode(self, now_s: float, out: list[Action]) -> None:
        """Elastic short-decode pool: shrink while two or more members sit empty; while shorts
        wait for a decode place, grow with empty GENERAL instances up to the pool's peak size
        (its configured size once every instance is up). While long requests wait, the last
        member is lent to GENERAL once empty (shorts decode where they prefill meanwhile);
        it comes back as soon as no long waits and a GENERAL instance sits empty."""
        st = self._state
        self._decode_pool_peak = max(self._decode_pool_peak, st.census.count(_DECODE))
        while st.census.count(_DECODE) > 1:
            best = st.pool.best(_DECODE, Slot.OPEN)
            if best is None or not self._is_empty(best):
                break  # cheap check first: no empty member, nothing to give back
            emptiest = st.pool.top(_DECODE, Slot.OPEN, 2)
            if len(emptiest) < 2 or not all(self._is_empty(i) for i in emptiest):
                break
            st.change_role(emptiest[1], _GENERAL)
        while st.transfer_wait and st.census.count(_DECODE) < self._decode_pool_peak:
            candidate = st.pool.best(_GENERAL, Slot.OPEN)
            if candidate is None or not self._is_empty(candidate):
                break
            st.change_role(candidate, _DECODE)
            self._place_transfers(now_s, out)

    def _lend_or_reclaim_last_decoder(self) -> bool:
        """Lend the last, empty short-decode instance to GENERAL while longs wait; take an
        empty GENERAL one back when none waits, never the last GENERAL one. True when it lent
        one."""
        st = self._state
        count = st.census.count(_DECODE)
        if count == 1 and self._lend_last_decoder and not st.transfer_wait:
            last = st.pool.best(_DECODE, Slot.OPEN)
            if last is not None and self._is_empty(last):
                st.change_role(last, _GENERAL)
                return True
        elif (
            count == 0
            and not self._lend_last_decoder
            and self._decode_pool_peak > 0
            and st.census.count(_GENERAL) > 1  # a decoder alone could prefill nothing
        ):
            candidate = st.pool.best(_GENERAL, Slot.OPEN)
            if candidate is not None and self._is_empty(candidate):
                st.change_role(candidate, _DECODE)
        return False

    def _is_empty(self, inst: InstanceRecord) -> bool:
        st = self._state
        return not inst.decoding and st.ledger.used(inst.instance_id) == 0

    def _next_timer_s(self, now_s: float) -> float:
        st, aging_s = self._state, self._config.long_aging_s
        wake_s = st.pause_deadlines[0][0] if st.pause_deadlines else math.inf
        oldest = self._head(RequestClass.LONG)
        if aging_s is not None and oldest is not None:
            aged_s = oldest.spec.arrival_s + aging_s
            if aged_s > now_s:
                wake_s = min(wake_s, aged_s)
        return wake_s

    def _place_shorts(self, now_s: float, out: list[Action]) -> None:
        while (req := self._head(RequestClass.SHORT)) is not None:
            in_place = self._short_decodes_in_place(req)
            if self._place_short(req, now_s, out, self._short_slots, decode_in_place=in_place):
                continue
            if self._config.preemption and self._preempt_for(req, now_s, out, in_place):
                continue
            if not self._reject_if_never_fits(req, out):
                return

    def _serve_aged_longs(self, now_s: float, out: list[Action]) -> bool:
        """Start long requests queued for `long_aging_s` or more, before any short.

        An aged long that does not fit the open instances holds them, one by one as they
        become open, until the held ones can take it: shorts keep every other instance.
        Returns True when an aged long still waits.
        """
        st, cfg = self._state, self._config
        while (req := self._head(RequestClass.LONG)) is not None:
            if cfg.long_aging_s is None or now_s - req.spec.arrival_s < cfg.long_aging_s:
                return False
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

    def _short_decodes_in_place(self, req: RequestRecord) -> bool:
        if not self._config.disaggregation:
            return True
        if self._lend_last_decoder and self._state.census.count(_DECODE) <= 1:
            return True  # the last decoder drains, to be lent to GENERAL
        decoders = self._state.census.capacities(InstanceRole.SHORT_DECODE)
        return not decoders or decoders[-1] < req.spec.total_tokens

    def _preempt_for(
        self, req: RequestRecord, now_s: float, out: list[Action], in_place: bool
    ) -> bool:
        """Pause a running long prefill and start `req` on one of its instances."""
        st = self._state
        need = req.spec.total_tokens if in_place else req.spec.prompt_tokens
        found = self._find_victim(req, need, now_s)
        if found is None:
            return False
        victim, host = found
        out.append(st.pause(victim, now_s, f"make room for short request {req.request_id}"))
        reason = f"preempted long request {victim.request_id} on {host.instance_id}"
        out.append(
            st.start_prefill(req, [host], decode_in_place=in_place, now_s=now_s, reason=reason)
        )
        return True

    def _find_victim(
        self, req: RequestRecord, need_tokens: int, now_s: float
    ) -> tuple[RequestRecord, InstanceRecord] | None:
        st = self._state
        heap = st.running_longs
        skipped: list[VictimEntry] = []
        found = None
        while heap and len(skipped) < _MAX_VICTIMS_TRIED:
            entry = heapq.heappop(heap)
            victim = st.requests.get(entry[3])
            if (
                victim is None
                or victim.state is not RequestState.PREFILLING
                or victim.num_preemptions != entry[4]
                or not st.preemptible(victim)
                or victim.chunks_done + 1 >= victim.chunks_total  # last chunk in flight
            ):
                continue  # stale for good
            if not st.pause_due(victim):
                skipped.append(entry)  # not before its duty cycle's chunks ran
                continue
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
            if host is not None and st.ledger.can_allocate(host.instance_id, need_tokens):
                found = (victim, host)
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _protect_starving(self, now_s: float) -> None:
        st = self._state
        heap = st.pause_deadlines
        while heap and heap[0][0] <= now_s:
            _, _, request_id, preemptions = heapq.heappop(heap)
            req = st.requests.get(request_id)
            if (
                req is not None
                and req.state is RequestState.PAUSED
                and req.num_preemptions == preemptions
            ):
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
