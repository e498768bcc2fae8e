"""`ClusterState`: the bookkeeping every policy shares, and the primitives that change it.

Each primitive applies one lifecycle rule, keeps KV accounting, instance slots, queues and
counters consistent, and returns the action the driver must carry out. Policies decide *what*
to do; only this module changes state. Invariants (checked by the property tests):

- an instance's KV allocations never exceed its capacity (the ledger refuses);
- a request holds at most one prefill slot per instance of its SP group, and appears in exactly
  one queue, prefill group, transfer or decode placement at a time;
- a PAUSED request holds KV but no prefill slot; its group's slots are free for others.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from controlplane.core import lifecycle
from controlplane.core.accounting import KvLedger, split_tokens
from controlplane.core.actions import (
    Action,
    Cancel,
    Colocate,
    Pause,
    Reject,
    Resume,
    StartDecode,
    StartPrefill,
    TransferKV,
)
from controlplane.core.config import SchedulerConfig
from controlplane.core.pool import InstancePool
from controlplane.core.queues import RequestQueue
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.roles import RoleCensus, RolePlan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_LONG = RequestClass.LONG
_S = RequestState


class VictimEntry(NamedTuple):
    """A running long prefill that may be paused; `running_longs` orders them best victim
    first: fewest instances idled by the pause, least paused so far, newest."""

    sp_degree: int  # instances of its prefill group
    paused_total_s: float  # paused so far when pushed
    neg_seq: int  # -admission seq: newest first
    request_id: str
    preemptions: int  # its pause count when pushed; a later pause makes the entry stale


class PauseDeadline(NamedTuple):
    """When a paused request reaches the starvation bound (`pause_deadlines`, earliest first)."""

    at_s: float
    seq: int  # admission seq: ties in admission order
    request_id: str
    preemptions: int  # its pause count when paused; a later pause makes the entry stale


class Deadline(NamedTuple):
    """A request's deadline (`deadlines`, earliest first)."""

    at_s: float
    seq: int  # admission seq: ties in admission order
    request_id: str


class ClusterState:
    """Requests, instances, KV ledger, queues and indices of one policy."""

    def __init__(self, config: SchedulerConfig, rng: Tiebreak, role_plan: RolePlan) -> None:
        self.config = config
        self.rng = rng
        self.role_plan = role_plan
        self.ledger = KvLedger()
        self.pool = InstancePool(self.ledger, config.max_decode_batch)
        self.census = RoleCensus()
        self.requests: dict[str, RequestRecord] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.queues = {c: RequestQueue() for c in RequestClass}
        self.queued_tokens: Counter[RequestClass] = Counter()
        self.counts: Counter[tuple[RequestClass, RequestState]] = Counter()
        self.stats: Counter[str] = Counter()
        self.transfer_wait: deque[str] = deque()  # TRANSFERRING_KV requests without a dst
        self.transfer_wait_joins = 0  # requests put in transfer_wait, ever
        self.ready_to_decode: deque[str] = deque()  # KV arrived at dst; StartDecode next
        self.to_reject: deque[tuple[str, str]] = deque()  # (request id, reason) from admission
        self.pending: list[Action] = []  # actions produced while observing (Cancel)
        self.completed: list[str] = []  # became terminal since take_completed()
        self.resumable: set[str] = set()  # paused requests whose group may be free now
        # Heaps; entries may be stale (checked when popped). Read them through the methods of
        # "timers and victims" below.
        self.running_longs: list[VictimEntry] = []  # preemption candidates, best first
        self.pause_deadlines: list[PauseDeadline] = []  # starvation bounds of paused requests
        self.deadlines: list[Deadline] = []  # request deadlines
        self.refusal_expiries: list[float] = []  # when refusal backoffs end (a plan timer)
        self.next_seq = 0
        # Set by anything that may let a waiting request start: an instance re-offered, a
        # request queued. schedule() skips planning while it is clear and no timer is due.
        self.dirty = True

    # ---- lifecycle bookkeeping -------------------------------------------------------------

    def set_state(self, req: RequestRecord, rule: lifecycle.TransitionRule) -> None:
        """Move `req` by `rule` (validated) and keep the per-class counters."""
        new_state = lifecycle.transition(rule, req.request_id, req.state)
        self.counts[(req.request_class, req.state)] -= 1
        self.counts[(req.request_class, new_state)] += 1
        req.state = new_state

    def enqueue(self, req: RequestRecord) -> None:
        """Put a QUEUED request in its class queue (admission order within a priority)."""
        self.queues[req.request_class].push(req.request_id, (-req.spec.priority, req.seq))
        self.queued_tokens[req.request_class] += req.spec.prompt_tokens
        self.dirty = True

    def dequeue(self, req: RequestRecord) -> None:
        """Take a request out of its queue (no-op when it is not queued)."""
        queue = self.queues[req.request_class]
        if req.request_id in queue:
            queue.remove(req.request_id)
            self.queued_tokens[req.request_class] -= req.spec.prompt_tokens

    def refresh(self, instance_ids: Iterable[str]) -> None:
        """Re-offer instances after a change; paused requests on free slots may resume."""
        for instance_id in instance_ids:
            inst = self.instances.get(instance_id)
            if inst is None:
                continue
            self.dirty = True
            self.pool.refresh(inst)
            if inst.prefill_id is None and inst.paused:
                self.resumable.update(inst.paused)

    def wait_for_transfer(self, request_id: str, *, front: bool = False) -> None:
        """Queue a prefilled request for a KV transfer destination (front: a retry)."""
        if front:
            self.transfer_wait.appendleft(request_id)
        else:
            self.transfer_wait.append(request_id)
        self.transfer_wait_joins += 1

    # ---- primitives returning actions ------------------------------------------------------

    def start_prefill(
        self,
        req: RequestRecord,
        group: Sequence[InstanceRecord],
        *,
        decode_in_place: bool,
        now_s: float,
        reason: str,
        colocate: bool = False,
        colocate_budget_tokens: int | None = None,
        chunk_tokens: int | None = None,
    ) -> Action:
        """Start `req`'s prefill on `group` (rank order), reserving its KV there.

        KV reserved: prompt + max_new_tokens when it decodes in place, else the prompt only.
        `colocate` makes it a budgeted Colocate on group[0] (a host decoding a long request):
        `colocate_budget_tokens` prompt tokens a step, else `colocation_budget_tokens`.
        `chunk_tokens`: its chunk size, else `config.prefill_chunk_tokens` at the group's size.
        """
        spec = req.spec
        need = spec.total_tokens if decode_in_place else spec.prompt_tokens
        ids = tuple(inst.instance_id for inst in group)
        shares = split_tokens(need, [self.ledger.free_tokens(i) for i in ids])
        for inst, share in zip(group, shares, strict=True):
            assert inst.prefill_id is None, f"{inst.instance_id} busy with {inst.prefill_id}"
            self.ledger.allocate(req.request_id, inst.instance_id, share)
            inst.prefill_id = req.request_id
        self.dequeue(req)
        self.set_state(req, lifecycle.START_PREFILL)
        chunk = chunk_tokens or self.config.prefill_chunk_tokens(spec.prompt_tokens, len(ids))
        req.prefill_ids = ids
        req.decode_ids = ()
        req.decode_in_place = decode_in_place
        req.chunks_done = 0
        req.chunks_total = -(-spec.prompt_tokens // chunk)
        if req.first_scheduled_s is None:
            req.first_scheduled_s = now_s
        req.resumed_at_chunk = 0
        if req.request_class is _LONG and self.preemptible(req):
            self._push_running_long(req)
        self.refresh(ids)
        if colocate:
            self.stats["colocations"] += 1
            return Colocate(
                req.request_id,
                ids[0],
                colocate_budget_tokens or self.config.colocation_budget_tokens,
                chunk,
                req.chunks_total,
                decode_in_place,
                reason,
            )
        sp_kind = self.config.sp_kind
        n = req.chunks_total
        return StartPrefill(req.request_id, ids, sp_kind, chunk, n, 0, decode_in_place, reason)

    def start_mixed_prefill(
        self,
        req: RequestRecord,
        inst: InstanceRecord,
        *,
        chunk_tokens: int,
        batch_tokens: int,
        now_s: float,
        reason: str,
    ) -> Colocate:
        """Admit `req` to `inst`'s mixed batches (sarathi), reserving prompt + output KV there.

        The prefill slot stays free: several such prefills share the instance's iterations, at
        most `chunk_tokens` each and `batch_tokens` in all, decodes first (see actions.Colocate).
        It decodes in place and is never paused.
        """
        spec = req.spec
        self.ledger.allocate(req.request_id, inst.instance_id, spec.total_tokens)
        self.dequeue(req)
        self.set_state(req, lifecycle.START_PREFILL)
        req.prefill_ids = (inst.instance_id,)
        req.decode_ids = ()
        req.decode_in_place = True
        req.chunks_done = 0
        req.chunks_total = -(-spec.prompt_tokens // chunk_tokens)
        if req.first_scheduled_s is None:
            req.first_scheduled_s = now_s
        self.refresh(req.prefill_ids)
        n = req.chunks_total
        rid, iid = req.request_id, inst.instance_id
        return Colocate(rid, iid, chunk_tokens, chunk_tokens, n, True, reason, batch_tokens)

    def pause(self, req: RequestRecord, now_s: float, reason: str) -> Pause:
        """Pause `req`'s prefill at its next chunk boundary; its group's slots become free
        (a protected request's group is held for it: it resumes once the slot it lent frees)."""
        self.set_state(req, lifecycle.PAUSE)
        req.num_preemptions += 1
        req.paused_since_s = now_s
        self.stats["preemptions"] += 1
        for instance_id in req.prefill_ids:
            inst = self.instances[instance_id]
            inst.prefill_id = None
            inst.paused.add(req.request_id)
            if req.is_protected:
                inst.held_for = req.request_id
        left_s = max(0.0, self.config.max_pause_s - req.paused_total_s)
        entry = PauseDeadline(now_s + left_s, req.seq, req.request_id, req.num_preemptions)
        heapq.heappush(self.pause_deadlines, entry)
        self.refresh(req.prefill_ids)
        return Pause(req.request_id, req.prefill_ids, reason)

    def protect(self, req: RequestRecord) -> None:
        """Starvation bound reached: `req` is never paused again; hold its group for it."""
        req.is_protected = True
        if req.state is _S.PAUSED:
            for instance_id in req.prefill_ids:
                self.instances[instance_id].held_for = req.request_id
            self.refresh(req.prefill_ids)
            self.resumable.add(req.request_id)

    def change_role(self, inst: InstanceRecord, role: InstanceRole) -> None:
        """Move an idle instance to another role (census and pools follow)."""
        assert not inst.decoding and inst.prefill_id is None, f"{inst.instance_id} is busy"
        self.census.remove(inst.role, inst.spec)
        self.census.add(role, inst.spec)
        self.pool.change_role(inst, role)
        self.stats["role_changes"] += 1
        self.dirty = True

    def hold(self, req: RequestRecord, inst: InstanceRecord) -> None:
        """Keep `inst` free of new work until the queued `req` starts (starvation bound)."""
        assert inst.held_for is None, f"{inst.instance_id} already held for {inst.held_for}"
        inst.held_for = req.request_id
        req.held_ids += (inst.instance_id,)
        self.refresh((inst.instance_id,))

    def release_holds(self, req: RequestRecord) -> list[InstanceRecord]:
        """Stop holding instances for `req`; returns those still up, in hold order."""
        held = [self.instances[i] for i in req.held_ids if i in self.instances]
        req.held_ids = ()
        for inst in held:
            if inst.held_for == req.request_id:
                inst.held_for = None
        self.refresh(inst.instance_id for inst in held)
        return held

    def group_is_free(self, req: RequestRecord) -> bool:
        """True when every instance of `req`'s prefill group has a free prefill slot."""
        return all(self.instances[i].prefill_id is None for i in req.prefill_ids)

    def resume(self, req: RequestRecord, now_s: float, reason: str) -> Resume:
        """Resume a paused prefill on its (free) group."""
        self.set_state(req, lifecycle.RESUME)
        self._end_pause(req, now_s)
        for instance_id in req.prefill_ids:
            inst = self.instances[instance_id]
            assert inst.prefill_id is None, f"resume {req.request_id}: {instance_id} busy"
            inst.prefill_id = req.request_id
        req.resumed_at_chunk = req.chunks_done
        if self.preemptible(req):
            self._push_running_long(req)
        self.refresh(req.prefill_ids)
        return Resume(req.request_id, req.prefill_ids, reason)

    def preemptible(self, req: RequestRecord) -> bool:
        """Whether `req` may ever be paused again (unprotected, or on the duty cycle)."""
        return not req.is_protected or self.config.protected_duty_cycle_chunks is not None

    def chunks_before_pause(self, req: RequestRecord) -> int:
        """Chunks `req` must run after it (re)started before it may be paused: the duty cycle
        when protected, else `min_chunks_between_pauses` (call only when `preemptible`)."""
        if req.is_protected:
            return self.config.protected_duty_cycle_chunks or 0
        return self.config.min_chunks_between_pauses

    def pause_due(self, req: RequestRecord) -> bool:
        """A preemptible `req` has run enough chunks since it last (re)started to be paused."""
        return req.chunks_done - req.resumed_at_chunk >= self.chunks_before_pause(req)

    def finish_prefill(self, req: RequestRecord, at_s: float) -> None:
        """Last chunk done: decode in place, or wait for a KV transfer destination."""
        if req.state is _S.PAUSED:
            self._end_pause(req, at_s)
        for instance_id in req.prefill_ids:
            inst = self.instances[instance_id]
            if inst.prefill_id == req.request_id:
                inst.prefill_id = None
        req.chunks_done = req.chunks_total
        req.prefill_done_s = at_s
        if req.first_token_s is None:
            req.first_token_s = at_s
        if req.decode_in_place:
            self.set_state(req, lifecycle.DECODE_IN_PLACE)
            self._add_decoder(req, req.prefill_ids)
        else:
            self.set_state(req, lifecycle.BEGIN_KV_TRANSFER)
            self.wait_for_transfer(req.request_id)
        self.refresh(req.prefill_ids)

    def begin_transfer(self, req: RequestRecord, dst: InstanceRecord, reason: str) -> TransferKV:
        """Reserve the whole KV on `dst` (and a decode place) and stream it there."""
        self.ledger.allocate(req.request_id, dst.instance_id, req.spec.total_tokens)
        dst.decoding.add(req.request_id)
        req.transfer_dst = dst.instance_id
        req.transfer_attempts += 1
        self.stats["kv_transfers"] += 1
        self.refresh((dst.instance_id,))
        return TransferKV(req.request_id, req.prefill_ids[0], dst.instance_id, reason)

    def transfer_done(self, req: RequestRecord, ok: bool) -> None:
        """A transfer ended: free the source on success, else the destination (retry)."""
        dst = req.transfer_dst
        assert dst is not None, f"{req.request_id}: transfer done without a destination"
        if ok:
            self.ledger.free(req.request_id, req.prefill_ids[0])
            req.decode_ids = (dst,)
            self.ready_to_decode.append(req.request_id)
            self.refresh(req.prefill_ids)
            return
        self.ledger.free(req.request_id, dst)
        inst = self.instances.get(dst)
        if inst is not None:
            inst.decoding.discard(req.request_id)
        req.transfer_dst = None
        self.wait_for_transfer(req.request_id, front=True)
        self.refresh((dst,))

    def start_decode(self, req: RequestRecord, reason: str) -> StartDecode:
        """Start decoding where the KV now is (a finished transfer, or in place on the source)."""
        self.set_state(req, lifecycle.START_DECODE)
        if not req.decode_ids:  # fallback: decode where it was prefilled
            src = req.prefill_ids[0]
            self.ledger.allocate(req.request_id, src, req.spec.max_new_tokens)
            self._add_decoder(req, (src,))
            self.refresh((src,))
        req.transfer_dst = None
        return StartDecode(req.request_id, req.decode_ids[0], reason)

    def reject(self, req: RequestRecord, reason: str) -> Reject:
        """Fail a queued request that can never fit."""
        self.release_holds(req)
        self.dequeue(req)
        self._terminate(req, lifecycle.FAIL, reason, req.spec.arrival_s)
        self.stats["failed"] += 1
        return Reject(req.request_id, reason)

    # ---- teardown --------------------------------------------------------------------------

    def release(self, req: RequestRecord) -> tuple[str, ...]:
        """Drop every slot, decode place and KV of `req`; returns the instances it was on."""
        rid = req.request_id
        self.release_holds(req)
        touched = set(self.ledger.free_all(rid))
        for instance_id in (*req.prefill_ids, *req.decode_ids, req.transfer_dst):
            inst = self.instances.get(instance_id) if instance_id else None
            if inst is None:
                continue
            touched.add(instance_id)  # type: ignore[arg-type]
            if inst.prefill_id == rid:
                inst.prefill_id = None
            inst.paused.discard(rid)
            if inst.held_for == rid:
                inst.held_for = None
            if rid in inst.decoding:
                inst.decoding.discard(rid)
                if req.request_class is _LONG:
                    inst.num_long_decoding -= 1
        self.dequeue(req)
        req.transfer_dst = None
        live = tuple(sorted(i for i in touched if i in self.instances))
        self.refresh(live)
        return live

    def cancel(
        self, req: RequestRecord, rule: lifecycle.TransitionRule, error: str, at_s: float
    ) -> None:
        """Terminate `req` by CANCEL or FAIL, freeing everything; queues a Cancel action."""
        instance_ids = self.release(req)
        self._terminate(req, rule, error, at_s)
        self.stats["cancelled" if rule is lifecycle.CANCEL else "failed"] += 1
        self.pending.append(Cancel(req.request_id, instance_ids, error))

    def finish(self, req: RequestRecord, at_s: float) -> None:
        """Terminate `req` as FINISHED, freeing everything."""
        self.release(req)
        self._terminate(req, lifecycle.FINISH, "", at_s)

    def requeue(self, req: RequestRecord, reason: str) -> tuple[str, ...]:
        """Send `req` back to its queue (front: it keeps its admission order) from scratch;
        returns the instances it was released from."""
        instance_ids = self.release(req)
        if req.state is _S.PAUSED:
            req.paused_since_s = None
        self.set_state(req, lifecycle.REQUEUE)
        req.num_requeues += 1
        req.chunks_done = req.chunks_total = 0
        req.prefill_ids = req.decode_ids = ()
        req.is_protected = False
        req.transfer_attempts = 0
        self.enqueue(req)
        if instance_ids:
            self.pending.append(Cancel(req.request_id, instance_ids, f"requeued: {reason}"))
        return instance_ids

    def remember_refusal(
        self, req: RequestRecord, instance_ids: Iterable[str], at_s: float
    ) -> None:
        """`instance_ids` refused `req`: skip them for it until their free KV changes or its
        back-off passes (see `refused`). The back-off of the k-th retryable failure in a row
        is `refused_instance_backoff_s * 2**(k-1)`, at most `refused_instance_backoff_max_s`:
        an instance that keeps refusing a request (e.g. KV fragmentation) is not offered it in
        a tight loop. The one back-off rule of the live runtime and the simulator alike."""
        req.failures_in_row += 1
        config = self.config
        backoff_s = config.refused_instance_backoff_s * 2.0 ** min(req.failures_in_row - 1, 32)
        until_s = at_s + min(backoff_s, config.refused_instance_backoff_max_s)
        for instance_id in instance_ids:
            req.refusals[instance_id] = (self.ledger.free_tokens(instance_id), until_s)
        heapq.heappush(self.refusal_expiries, until_s)

    def refused(self, req: RequestRecord, instance_id: str, now_s: float) -> bool:
        """True while `instance_id`'s refusal of `req` stands (same free KV, backoff running)."""
        entry = req.refusals.get(instance_id)
        if entry is None:
            return False
        free_then, until_s = entry
        if now_s < until_s and self.ledger.free_tokens(instance_id) == free_then:
            return True
        del req.refusals[instance_id]
        return False

    # ---- timers and victims ----------------------------------------------------------------

    def add_deadline(self, req: RequestRecord) -> None:
        """Fail `req` when its spec's deadline passes (see `pop_expired_deadlines`)."""
        assert req.spec.deadline_s is not None, f"{req.request_id} has no deadline"
        heapq.heappush(self.deadlines, Deadline(req.spec.deadline_s, req.seq, req.request_id))

    def pop_expired_deadlines(self, now_s: float) -> list[RequestRecord]:
        """Live requests whose deadline is at or before `now_s`, earliest first (removed)."""
        heap, out = self.deadlines, []
        while heap and heap[0].at_s <= now_s:
            req = self.requests.get(heapq.heappop(heap).request_id)
            if req is not None and not req.state.is_terminal:
                out.append(req)
        return out

    def pop_starving(self, now_s: float) -> list[RequestRecord]:
        """Paused requests whose starvation bound (`max_pause_s` of pauses) is at or before
        `now_s` and that were not resumed and paused again since, earliest first (removed)."""
        heap, out = self.pause_deadlines, []
        while heap and heap[0].at_s <= now_s:
            entry = heapq.heappop(heap)
            req = self.requests.get(entry.request_id)
            if (
                req is not None
                and req.state is _S.PAUSED
                and req.num_preemptions == entry.preemptions
            ):
                out.append(req)
        return out

    def next_starvation_s(self) -> float:
        """When the earliest pending starvation bound falls (inf: none; may be stale)."""
        return self.pause_deadlines[0].at_s if self.pause_deadlines else math.inf

    def pop_lapsed_refusals(self, now_s: float) -> bool:
        """Drop the refusal backoffs ended at or before `now_s`; True when one did (a refused
        placement may be retried)."""
        expiries, lapsed = self.refusal_expiries, False
        while expiries and expiries[0] <= now_s:
            heapq.heappop(expiries)
            lapsed = True
        return lapsed

    def next_refusal_lapse_s(self) -> float:
        """When the earliest refusal backoff ends (inf: none)."""
        return self.refusal_expiries[0] if self.refusal_expiries else math.inf

    def pop_victim(self) -> tuple[VictimEntry, RequestRecord] | None:
        """The best running long prefill that may be paused (still PREFILLING, not paused
        since it was pushed, preemptible), removed from `running_longs`; stale entries popped
        on the way are dropped. None when there is none. Give back the ones not paused with
        `push_victim`."""
        heap = self.running_longs
        while heap:
            entry = heapq.heappop(heap)
            req = self.requests.get(entry.request_id)
            if (
                req is not None
                and req.state is _S.PREFILLING
                and req.num_preemptions == entry.preemptions
                and self.preemptible(req)
            ):
                return entry, req
        return None

    def push_victim(self, entry: VictimEntry) -> None:
        """Put back an entry `pop_victim` returned (its request was not paused)."""
        heapq.heappush(self.running_longs, entry)

    def _terminate(
        self, req: RequestRecord, rule: lifecycle.TransitionRule, error: str, at_s: float
    ) -> None:
        self.set_state(req, rule)
        req.error = error
        req.finished_s = at_s
        self.completed.append(req.request_id)

    def _end_pause(self, req: RequestRecord, now_s: float) -> None:
        assert req.paused_since_s is not None, f"{req.request_id} paused without a start"
        req.paused_total_s += max(0.0, now_s - req.paused_since_s)
        req.paused_since_s = None
        if req.paused_total_s >= self.config.max_pause_s:
            req.is_protected = True
        for instance_id in req.prefill_ids:
            inst = self.instances[instance_id]
            inst.paused.discard(req.request_id)
            if inst.held_for == req.request_id:
                inst.held_for = None
        self.resumable.discard(req.request_id)

    def _add_decoder(self, req: RequestRecord, instance_ids: tuple[str, ...]) -> None:
        req.decode_ids = instance_ids
        for instance_id in instance_ids:
            inst = self.instances[instance_id]
            inst.decoding.add(req.request_id)
            if req.request_class is _LONG:
                inst.num_long_decoding += 1

    def _push_running_long(self, req: RequestRecord) -> None:
        if not self.config.preemption:
            return
        entry = VictimEntry(
            len(req.prefill_ids),
            req.paused_total_s,
            -req.seq,
            req.request_id,
            req.num_preemptions,
        )
        heapq.heappush(self.running_longs, entry)
