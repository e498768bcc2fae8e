"""Deterministic discrete-event engine driving a `controlplane.core` policy.

The loop is the runtime's loop with a simulated clock: take every event due at the earliest
time (heap keyed by (time, kind priority, seq), arrivals merged from the sorted workload), hand
them to `policy.observe`, call `policy.schedule(now_s)` once, and carry the Decision's actions
out on simulated instances (`sim.instances`), whose costs come from `sim.cost_model`. Nothing
depends on wall time or hash order, so the same inputs give the same run.

Reporting: `TokensGenerated(1)` with `PrefillDone` (the first token), `TokensGenerated(rest)`
right before `RequestFinished`; no per-token events. A periodic tick (`tick_s`) calls
`schedule` while requests are active so time-only rules (aging, pause bounds) fire.

`batch_window_s` > 0 (large clusters) hands the policy every event of a window of that length
in one observe/schedule round at the window's end, as a runtime loop ticking at that period
would: events keep their own times, only the decisions wait (< one window). 0 is exact.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controlplane.core import actions as act
from controlplane.core import events as ev
from controlplane.core.policy import Policy
from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec
from sim.cost_model import CostModel
from sim.instances import INF, PrefillJob, SimInstance
from sim.metrics import RequestRecords

# Kind priorities at equal times: decode/colocation milestones, chunk ends, transfers.
_TICK, _CHUNK, _TRANSFER = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The simulated cluster: `num_gpus` GPUs in nodes of `cost.gpu.gpus_per_node`."""

    num_gpus: int  # GPUs in the cluster; instances = num_gpus // cost.tp
    cost: CostModel  # model, GPU type, tp and efficiencies of every instance

    def __post_init__(self) -> None:
        if self.num_gpus < self.cost.tp:
            raise ValueError(f"gpus={self.num_gpus} is fewer than one instance (tp={self.cost.tp})")

    @property
    def num_instances(self) -> int:
        """Model instances (replicas of tp GPUs)."""
        return self.num_gpus // self.cost.tp


@dataclass(frozen=True, slots=True)
class SimRun:
    """Raw outcome of one simulation."""

    records: RequestRecords  # per-request times
    busy_gpu_s: float  # Σ over instances of busy seconds x tp
    end_s: float  # simulated time the run stopped
    num_events: int  # engine events processed
    schedule_calls: int  # observe+schedule rounds
    policy_wall_s: float  # real seconds spent in observe + schedule
    decisions: tuple[str, ...]  # every action's repr when `log_decisions`, else empty


class Engine:
    """One simulation of `workload` on `cluster` under `policy` (use `run`)."""

    def __init__(
        self,
        cluster: ClusterSpec,
        policy: Policy,
        arrival_s: np.ndarray,
        prompt_tokens: np.ndarray,
        output_tokens: np.ndarray,
        isolated_jct: Callable[[int, int], float],
        tick_s: float = 2.0,
        max_idle_s: float = 3600.0,
        batch_window_s: float = 0.0,
        log_decisions: bool = False,
    ) -> None:
        self.cost = cluster.cost
        self.policy = policy
        self.tp = cluster.cost.tp
        per_node = max(1, cluster.cost.gpu.gpus_per_node // self.tp)
        self.instances = [
            SimInstance(i, f"i{i:05d}", i // per_node, cluster.cost)
            for i in range(cluster.num_instances)
        ]
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self.arrival = arrival_s.tolist()
        self.prompt = prompt_tokens.tolist()
        self.output = output_tokens.tolist()
        n = len(self.arrival)
        self.first_sched = [math.nan] * n
        self.first_token = [math.nan] * n
        self.finished = [math.nan] * n
        self.preempt = [0] * n
        self.threshold = policy.config.short_threshold_tokens
        self.isolated = [
            isolated_jct(p, o) if p >= self.threshold else math.nan
            for p, o in zip(self.prompt, self.output, strict=True)
        ]
        self.jobs: dict[int, PrefillJob] = {}  # live prefill jobs (running, pending, paused)
        self.decode_group: dict[int, tuple[int, ...]] = {}  # request -> decode instances
        self.heap: list[tuple[float, int, int, int, int]] = []  # (t, kind, seq, a, b)
        self.seq = 0
        self.out: list[ev.Event] = []  # events for the next observe
        self.tick_s = tick_s
        self.max_idle_s = max_idle_s
        self.batch_window_s = batch_window_s
        self.log: list[str] | None = [] if log_decisions else None
        self.chunk_cache: dict[tuple[int, int, int, str, bool], float] = {}
        self.num_events = 0
        self.active = 0  # requests arrived and not yet finished, rejected or cancelled

    # --- queue ------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: int, b: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, a, b))

    def _wake(self, inst: SimInstance) -> None:
        """Recompute `inst`'s iteration time and schedule its next milestone."""
        inst.recompute()
        t = inst.next_milestone_s()
        if t < INF:
            self._push(t, _TICK, inst.index, inst.version)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> SimRun:
        """Simulate until every request is terminal and nothing is in flight."""
        policy = self.policy
        policy.observe(
            [
                ev.InstanceUp(
                    InstanceSpec(
                        inst.instance_id,
                        f"node{inst.node:04d}",
                        InstanceRole.GENERAL,
                        self.tp,
                        self.cost.kv_capacity_tokens,
                    ),
                    0.0,
                )
                for inst in self.instances
            ]
        )
        n = len(self.arrival)
        nxt = 0
        calls = 0
        policy_wall = 0.0
        now = 0.0
        idle_since = INF  # when the engine last had nothing but ticks to process
        while True:
            self._drop_stale()
            t_next = min(
                self.heap[0][0] if self.heap else INF, self.arrival[nxt] if nxt < n else INF
            )
            if self.active > 0:
                if t_next == INF:
                    idle_since = min(idle_since, now)
                    if now - idle_since > self.max_idle_s:
                        break  # only ticks for a long while: the policy is stuck
                else:
                    idle_since = INF
                t_next = min(t_next, now + self.tick_s)
            if t_next == INF:
                break
            window = self.batch_window_s
            now = max(now, math.ceil(t_next / window) * window) if window > 0 else t_next
            while self.heap and self.heap[0][0] <= now:
                t, kind, _, a, b = heapq.heappop(self.heap)
                self.num_events += 1
                self._handle(kind, a, b, t)
            while nxt < n and self.arrival[nxt] <= now:
                t = self.arrival[nxt]
                self.out.append(
                    ev.RequestArrived(
                        RequestSpec(str(nxt), "sim", self.prompt[nxt], self.output[nxt], 0, t), t
                    )
                )
                self.num_events += 1
                self.active += 1
                nxt += 1
            events, self.out = self.out, []
            start = time.perf_counter()
            if events:
                policy.observe(events)
            decision = policy.schedule(now)
            policy_wall += time.perf_counter() - start
            calls += 1
            for action in decision.actions:
                self._apply(action, now)
            if calls % 4096 == 0:
                policy.take_completed()
        for inst in self.instances:
            inst.sync(now)
        busy = sum(inst.busy_s for inst in self.instances) * self.tp
        return SimRun(
            self._records(),
            busy,
            now,
            self.num_events,
            calls,
            policy_wall,
            tuple(self.log) if self.log is not None else (),
        )

    def _drop_stale(self) -> None:
        """Pop superseded wake-ups at the top of the heap so they never advance the clock."""
        heap = self.heap
        while heap:
            _, kind, _, a, b = heap[0]
            if kind == _TICK:
                stale = self.instances[a].version != b
            elif kind == _CHUNK:
                job = self.jobs.get(a)
                stale = job is None or not job.running or job.seq != b
            else:
                return
            if not stale:
                return
            heapq.heappop(heap)

    def _records(self) -> RequestRecords:
        prompt = np.array(self.prompt, dtype=np.int64)
        return RequestRecords(
            is_long=prompt >= self.threshold,
            arrival_s=np.array(self.arrival, dtype=np.float64),
            first_scheduled_s=np.array(self.first_sched, dtype=np.float64),
            first_token_s=np.array(self.first_token, dtype=np.float64),
            finished_s=np.array(self.finished, dtype=np.float64),
            output_tokens=np.array(self.output, dtype=np.int64),
            preemptions=np.array(self.preempt, dtype=np.int64),
            isolated_jct_s=np.array(self.isolated, dtype=np.float64),
        )

    # --- completions ----------------------------------------------------------------------------

    def _handle(self, kind: int, a: int, b: int, now: float) -> None:
        if kind == _TICK:
            inst = self.instances[a]
            if inst.version != b:
                return
            inst.sync(now)
            job = inst.slot
            if job is not None and job.is_colocated and inst.it >= job.end_it - 1e-6:
                inst.slot = None
                self._prefill_done(job, now)
                self._start_pending(inst, now)
            for req in inst.pop_finished():
                self._finish(req, now)
            self._wake(inst)
        elif kind == _CHUNK:
            job = self.jobs.get(a)
            if job is not None and job.running and job.seq == b:
                self._chunk_done(job, now)
        elif kind == _TRANSFER:
            self.out.append(ev.KVTransferDone(str(a), self.instances[b].instance_id, True, now))

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
            self._wake(inst)

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
        share = (self.prompt[req] + 1) / len(group)
        self.decode_group[req] = group
        for rank, i in enumerate(group):
            inst = self.instances[i]
            inst.sync(now)
            inst.add_member(req, share, self.output[req] - 1 if rank == 0 else None)
            self._wake(inst)

    def _finish(self, req: int, now: float) -> None:
        """`req`'s last token is out (its leader instance is synced and woken by the caller)."""
        group = self.decode_group.pop(req)
        for i in group:
            inst = self.instances[i]
            inst.sync(now)
            inst.remove_member(req)
            if i != group[0]:
                self._wake(inst)
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
        self._push(now + duration, _CHUNK, job.req, job.seq)

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
            self._wake(inst)

    def _start_pending(self, inst: SimInstance, now: float) -> None:
        waiting, inst.pending = inst.pending, []
        for job in waiting:
            if not job.running and self.jobs.get(job.req) is job and not job.pause_pending:
                self._try_start(job, now)

    # --- actions ------------------------------------------------------------------------------

    def _group(self, ids: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.by_id[i].index for i in ids)

    def _apply(self, action: act.Action, now: float) -> None:
        if self.log is not None:
            self.log.append(f"{now:.6f} {action!r}")
        if isinstance(action, act.StartPrefill):
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
        elif isinstance(action, act.Colocate):
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
        elif isinstance(action, act.Pause):
            req = int(action.request_id)
            self.preempt[req] += 1
            job = self.jobs[req]
            if job.running:
                job.pause_pending = True
            else:  # still waiting for its slots: it stops before starting a chunk
                job.pause_pending = True
                self.out.append(ev.PrefillPaused(action.request_id, job.next_chunk, now))
        elif isinstance(action, act.Resume):
            job = self.jobs[int(action.request_id)]
            job.pause_pending = False
            if not job.running:
                self._try_start(job, now)
        elif isinstance(action, act.TransferKV):
            src = self.by_id[action.src_instance_id]
            dst = self.by_id[action.dst_instance_id]
            req = int(action.request_id)
            duration = self.cost.kv_transfer_s(self.prompt[req] + 1, src.node != dst.node)
            self._push(now + duration, _TRANSFER, req, dst.index)
        elif isinstance(action, act.StartDecode):
            req = int(action.request_id)
            self._start_decode(req, (self.by_id[action.instance_id].index,), now)
        elif isinstance(action, act.Cancel | act.Reject):
            self._drop(int(action.request_id), now)

    def _drop(self, req: int, now: float) -> None:
        """Stop all work of `req` (cancel or reject); it stays unfinished in the records."""
        self.active -= 1
        job = self.jobs.pop(req, None)
        if job is not None and job.running:
            group = [self.instances[i] for i in job.group]
            for inst in group:
                inst.sync(now)
            self._release(job, group, now)
            for inst in group:
                self._start_pending(inst, now)
                self._wake(inst)
        group_ids = self.decode_group.pop(req, ())
        for i in group_ids:
            inst = self.instances[i]
            inst.sync(now)
            inst.remove_member(req)
            self._wake(inst)
