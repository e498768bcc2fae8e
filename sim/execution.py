"""Carrying out a policy's actions on simulated instances, and the completions they cause.

`Executor` owns the instances (`sim.instances`), the live prefill jobs and the event heap of one
simulation; `sim.engine.Engine` drives it. Heap entries are `SimEvent`s (`sim.events`).
Completions append the `controlplane.core` events the policy will observe to `out`.
"""

from __future__ import annotations

import heapq
import math

from controlplane.core import actions as act
from controlplane.core import events as ev
from sim.cost_model import CostModel, causal_pairs
from sim.events import CHUNK, MIXED, TICK, TRANSFER, SimEvent
from sim.instances import INF, PrefillJob, SimInstance

# SimEvent(...) without the keyword handling of a named tuple's __new__ (half its cost).
_new_event = tuple.__new__


class Executor:
    """Instances, jobs and pending events of one simulation (mutable; owned by the Engine)."""

    def __init__(
        self,
        cost: CostModel,
        num_instances: int,
        prompt_tokens: list[int],
        output_tokens: list[int],
        log_decisions: bool,
        tbt_slo_s: float = math.inf,
    ) -> None:
        self.cost = cost
        self.tp = cost.tp
        self.tbt_slo_s = tbt_slo_s
        per_node = max(1, cost.gpu.gpus_per_node // self.tp)
        self.instances = [
            SimInstance(i, f"i{i:05d}", i // per_node, cost, slow_dt_s=tbt_slo_s)
            for i in range(num_instances)
        ]
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self.prompt = prompt_tokens
        self.output = output_tokens
        n = len(prompt_tokens)
        self.first_sched = [math.nan] * n  # prefill first started executing
        self.first_token = [math.nan] * n
        self.finished = [math.nan] * n
        self.preempt = [0] * n
        self.gaps_over_slo = [0] * n  # token gaps longer than tbt_slo_s (see _start_decode)
        self.jobs: dict[int, PrefillJob] = {}  # live prefill jobs (running, pending, paused)
        self.decode_group: dict[int, tuple[int, ...]] = {}  # request -> decode instances
        self.heap: list[SimEvent] = []
        self.seq = 0
        self.out: list[ev.Event] = []  # events for the next observe
        self.log: list[str] | None = [] if log_decisions else None
        self.chunk_cache: dict[tuple[int, int, int, str, bool], float] = {}
        self.active = 0  # requests arrived and not yet finished, rejected or cancelled

    def push(self, t: float, kind: int, subject: int, tag: int) -> None:
        """Schedule a completion at `t` (see `SimEvent`)."""
        self.seq += 1
        heapq.heappush(self.heap, _new_event(SimEvent, (t, kind, self.seq, subject, tag)))

    def wake(self, inst: SimInstance) -> None:
        """Recompute `inst`'s iteration time and schedule its next milestone."""
        inst.recompute()
        t = inst.next_milestone_s()
        if t < INF:
            self.push(t, TICK, inst.index, inst.version)

    def drop_stale(self) -> None:
        """Pop superseded wake-ups at the top of the heap so they never advance the clock."""
        heap = self.heap
        while heap:
            _, kind, _, subject, tag = heap[0]
            if kind == TICK:
                stale = self.instances[subject].version != tag
            elif kind == CHUNK:
                job = self.jobs.get(subject)
                stale = job is None or not job.running or job.seq != tag
            elif kind == MIXED:
                stale = self.instances[subject].mixed_seq != tag
            else:
                return
            if not stale:
                return
            heapq.heappop(heap)

    # --- completions ----------------------------------------------------------------------------

    def handle(self, event: SimEvent) -> None:
        """Process one popped heap entry (it happens at `event.at_s`)."""
        now, kind, _, subject, tag = event
        if kind == TICK:
            inst = self.instances[subject]
            if inst.version != tag:
                return
            inst.sync(now)
            job = inst.slot
            if job is not None and job.is_colocated and inst.it >= job.end_it - 1e-6:
                inst.slot = None
                self._prefill_done(job, now)
                self._start_pending(inst, now)
            for req in inst.pop_finished():
                self._finish(req, now)
            self.wake(inst)
        elif kind == CHUNK:
            job = self.jobs.get(subject)
            if job is not None and job.running and job.seq == tag:
                self._chunk_done(job, now)
        elif kind == TRANSFER:
            dst = self.instances[tag].instance_id
            self.out.append(ev.KVTransferDone(str(subject), dst, True, now))
        elif kind == MIXED:
            inst = self.instances[subject]
            if inst.mixed_seq == tag:
                self._mixed_done(inst, now)

    def _chunk_done(self, job: PrefillJob, now: float) -> None:
        group = [self.instances[i] for i in job.group]
        for inst in group:
            inst.sync(now)
        job.next_chunk += 1
        if job.next_chunk >= job.num_chunks:
            self._release(job, group, now)
            self._prefill_done(job, now)
        elif job.pause_pending:
            self.out.append(ev.PrefillChunkDone(str(job.req), job.next_chunk - 1, now))
            self.out.append(ev.PrefillPaused(str(job.req), job.next_chunk, now))
            job.pause_pending = False
            self._release(job, group, now)
        else:
            self.out.append(ev.PrefillChunkDone(str(job.req), job.next_chunk - 1, now))
            self._run_chunk(job, now)
        for inst in group:
            if inst.slot is None:
                self._start_pending(inst, now)
            self.wake(inst)

    def _release(self, job: PrefillJob, group: list[SimInstance], now: float) -> None:
        job.running = False
        for inst in group:
            if inst.slot is job:
                inst.slot = None

    def _prefill_done(self, job: PrefillJob, now: float) -> None:
        req = job.req
        del self.jobs[req]
        self.first_token[req] = now
        rid = str(req)
        self.out.append(ev.PrefillDone(rid, now))
        self.out.append(ev.TokensGenerated(rid, 1, now))
        if self.output[req] == 1:
            self.finished[req] = now
            self.active -= 1
            self.out.append(ev.RequestFinished(rid, now))
        elif job.decode_in_place:
            self._start_decode(req, job.group, now)

    def _start_decode(self, req: int, group: tuple[int, ...], now: float) -> None:
        # Token gaps: every decode iteration of the leader, plus the handoff from the first
        # token to the decode start (a KV transfer, a wait for a decoder) when it alone is slow.
        if now - self.first_token[req] > self.tbt_slo_s:
            self.gaps_over_slo[req] += 1
        share = (self.prompt[req] + 1) / len(group)
        self.decode_group[req] = group
        for rank, i in enumerate(group):
            inst = self.instances[i]
            inst.sync(now)
            inst.add_member(req, share, self.output[req] - 1 if rank == 0 else None)
            self.wake(inst)

    def _finish(self, req: int, now: float) -> None:
        """`req`'s last token is out (its leader instance is synced and woken by the caller)."""
        group = self.decode_group.pop(req)
        for i in group:
            inst = self.instances[i]
            inst.sync(now)
            slow_iterations = inst.remove_member(req)
            if i != group[0]:
                self.wake(inst)
            else:
                self.gaps_over_slo[req] += round(slow_iterations)
        self.finished[req] = now
        self.active -= 1
        rid = str(req)
        if self.output[req] > 1:
            self.out.append(ev.TokensGenerated(rid, self.output[req] - 1, now))
        self.out.append(ev.RequestFinished(rid, now))

    # --- prefill slots ----------------------------------------------------------------------------

    def _chunk_s(self, job: PrefillJob) -> float:
        tokens, context = job.chunk_bounds()
        key = (tokens, context, len(job.group), job.sp_kind.value, job.cross_node)
        duration = self.chunk_cache.get(key)
        if duration is None:
            duration = self.cost.sp_prefill_s(
                tokens, context, len(job.group), job.sp_kind.value, job.cross_node
            )
            self.chunk_cache[key] = duration
        return duration

    def _run_chunk(self, job: PrefillJob, now: float) -> None:
        duration = self._chunk_s(job)
        lead = self.instances[job.group[0]]
        if lead.members:  # decodes sharing the instance: their token rides on the chunk
            batch, ctx = len(lead.members), lead.decode_context_tokens()
            duration += max(0.0, self.cost.decode_s(batch, ctx) - self.cost.decode_s(0, 0.0))
        job.chunk_duration_s = duration
        job.seq += 1
        self.push(now + duration, CHUNK, job.req, job.seq)

    def _try_start(self, job: PrefillJob, now: float) -> None:
        """Start `job` if every slot of its group is free, else wait on the busy ones."""
        group = [self.instances[i] for i in job.group]
        busy = [inst for inst in group if inst.slot is not None]
        if busy:
            for inst in busy:
                if job not in inst.pending:
                    inst.pending.append(job)
            return
        job.running = True
        if math.isnan(self.first_sched[job.req]):
            # Queueing ends when the prefill starts executing (after any chunk in flight).
            self.first_sched[job.req] = now
        for inst in group:
            inst.sync(now)
            inst.slot = job
        if job.is_colocated:
            host = group[0]
            job.end_it = host.it + math.ceil(job.prompt_tokens / job.colocate_budget_tokens)
        else:
            self._run_chunk(job, now)
        for inst in group:
            self.wake(inst)

    def _start_pending(self, inst: SimInstance, now: float) -> None:
        waiting, inst.pending = inst.pending, []
        for job in waiting:
            if not job.running and self.jobs.get(job.req) is job and not job.pause_pending:
                self._try_start(job, now)

    # --- mixed batches (sarathi) -------------------------------------------------------------

    def _run_mixed(self, inst: SimInstance, now: float) -> None:
        """Start one iteration: decodes first, then mixed jobs in start order under the budget."""
        inst.sync(now)
        decodes = len(inst.members)
        left = max(0, inst.mixed[0].mixed_batch_tokens - decodes)
        tokens = seqs = 0
        pairs = context = 0.0
        for job in inst.mixed:
            step = min(job.prompt_tokens - job.done_tokens, job.chunk_tokens, left)
            job.step_tokens = step
            left -= step
            if step:
                tokens += step
                seqs += 1
                pairs += causal_pairs(step, job.done_tokens)
                context += job.done_tokens
                if math.isnan(self.first_sched[job.req]):
                    self.first_sched[job.req] = now
        ctx = inst.decode_context_tokens()
        inst.mixed_start_s = now
        inst.mixed_dt = self.cost.iteration_s(tokens, pairs, context, seqs, decodes, ctx)
        inst.mixed_seq += 1
        self.push(now + inst.mixed_dt, MIXED, inst.index, inst.mixed_seq)
        self.wake(inst)

    def _mixed_done(self, inst: SimInstance, now: float) -> None:
        """An iteration ended: finished prompts decode; the next iteration starts if any remain."""
        inst.sync(now)
        inst.mixed_dt = INF
        done: list[PrefillJob] = []
        for job in inst.mixed:
            job.done_tokens += job.step_tokens
            job.step_tokens = 0
            if job.done_tokens >= job.prompt_tokens:
                done.append(job)
        inst.mixed = [job for job in inst.mixed if job not in done]
        for job in done:
            self._prefill_done(job, now)
        if inst.mixed:
            self._run_mixed(inst, now)
        else:
            self.wake(inst)

    # --- actions ------------------------------------------------------------------------------

    def _group(self, ids: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.by_id[i].index for i in ids)

    def apply(self, action: act.Action, now: float) -> None:
        """Carry out one action of a Decision at `now`."""
        if self.log is not None:
            self.log.append(f"{now:.6f} {action!r}")
        match action:
            case act.StartPrefill():
                self._start_prefill(action, now)
            case act.Colocate() if action.mixed_batch_tokens:
                self._start_mixed(action, now)
            case act.Colocate():
                self._start_colocated(action, now)
            case act.Pause():
                self._pause(action, now)
            case act.Resume():
                job = self.jobs[int(action.request_id)]
                job.pause_pending = False
                if not job.running:
                    self._try_start(job, now)
            case act.TransferKV():
                src = self.by_id[action.src_instance_id]
                dst = self.by_id[action.dst_instance_id]
                req = int(action.request_id)
                duration = self.cost.kv_transfer_s(self.prompt[req] + 1, src.node != dst.node)
                self.push(now + duration, TRANSFER, req, dst.index)
            case act.StartDecode():
                req = int(action.request_id)
                self._start_decode(req, (self.by_id[action.instance_id].index,), now)
            case act.Cancel() | act.Reject():
                self._drop(int(action.request_id), now)

    def _start_prefill(self, action: act.StartPrefill, now: float) -> None:
        """A prefill on its SP group: it starts once every slot of the group is free."""
        req = int(action.request_id)
        group = self._group(action.instance_ids)
        job = PrefillJob(
            req,
            group,
            self.prompt[req],
            action.chunk_tokens,
            action.num_chunks,
            action.first_chunk_index,
            action.decode_in_place,
            action.sp_kind,
            cross_node=len({self.instances[i].node for i in group}) > 1,
        )
        self.jobs[req] = job
        self._try_start(job, now)

    def _start_mixed(self, action: act.Colocate, now: float) -> None:
        """A prefill joining its host's mixed batches (sarathi); the slot stays free."""
        req = int(action.request_id)
        inst = self.by_id[action.host_instance_id]
        assert inst.slot is None, f"mixed prefill {req} on {inst.instance_id}: slot taken"
        job = PrefillJob(
            req,
            (inst.index,),
            self.prompt[req],
            action.chunk_tokens,
            action.num_chunks,
            0,
            action.decode_in_place,
            mixed_batch_tokens=action.mixed_batch_tokens,
        )
        self.jobs[req] = job
        inst.mixed.append(job)
        if inst.mixed_dt == INF or inst.mixed_start_s == now:  # (re)plan the iteration
            self._run_mixed(inst, now)

    def _start_colocated(self, action: act.Colocate, now: float) -> None:
        """A prefill inside its host's decode iterations, a token budget per iteration."""
        req = int(action.request_id)
        host = self.by_id[action.host_instance_id].index
        job = PrefillJob(
            req,
            (host,),
            self.prompt[req],
            action.chunk_tokens,
            action.num_chunks,
            0,
            action.decode_in_place,
            colocate_budget_tokens=action.iteration_prefill_budget_tokens,
        )
        self.jobs[req] = job
        self._try_start(job, now)

    def _pause(self, action: act.Pause, now: float) -> None:
        """Stop a prefill at its next chunk boundary (at once when no chunk runs)."""
        req = int(action.request_id)
        self.preempt[req] += 1
        job = self.jobs[req]
        job.pause_pending = True  # a running chunk completes first (see _chunk_done)
        if not job.running:  # still waiting for its slots: it stops before any chunk
            self.out.append(ev.PrefillPaused(action.request_id, job.next_chunk, now))

    def _drop(self, req: int, now: float) -> None:
        """Stop all work of `req` (cancel or reject); it stays unfinished in the records."""
        self.active -= 1
        job = self.jobs.pop(req, None)
        if job is not None and job.mixed_batch_tokens:  # its tokens in flight are wasted
            host = self.instances[job.group[0]]
            host.mixed = [j for j in host.mixed if j is not job]
        if job is not None and job.running:
            group = [self.instances[i] for i in job.group]
            for inst in group:
                inst.sync(now)
            self._release(job, group, now)
            for inst in group:
                self._start_pending(inst, now)
                self.wake(inst)
        group_ids = self.decode_group.pop(req, ())
        for i in group_ids:
            inst = self.instances[i]
            inst.sync(now)
            inst.remove_member(req)
            self.wake(inst)
