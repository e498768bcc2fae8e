"""`ClusterState`: the primitives that change a policy's shared state (`StateBook`).

Each primitive applies one lifecycle rule, keeps KV accounting, instance slots, queues and
counters consistent, and returns the action the driver must carry out. Policies decide *what*
to do; only this module and its base change state. Invariants (checked by the property tests):

- an instance's KV allocations never exceed its capacity (the ledger refuses);
- a request holds at most one prefill slot per instance of its SP group, and appears in exactly
  one queue, prefill group, transfer or decode placement at a time;
- a PAUSED request holds KV but no prefill slot; its group's slots are free for others.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.core import lifecycle
from controlplane.core.accounting import split_tokens
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
from controlplane.core.bookkeeping import StateBook
from controlplane.core.preemption import VictimEntry
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.types import RequestClass, RequestState

__all__ = ["ClusterState", "VictimEntry"]  # VictimEntry: policies import it from here

_LONG = RequestClass.LONG
_S = RequestState


class ClusterState(StateBook):
    """Requests, instances, KV ledger, queues and indices of one policy, and the primitives
    that change them (each returns the action the driver must carry out)."""

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
            self.preemption.push_running(req)
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
        self.preemption.add_pause_deadline(req, now_s)
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
            self.preemption.push_running(req)
        self.refresh(req.prefill_ids)
        return Resume(req.request_id, req.prefill_ids, reason)

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

    # ---- internals -------------------------------------------------------------------------

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
