"""What a simulated model instance is doing: its prefill slot and its decode batch.

Execution model (the data-plane semantics in `controlplane.core.actions`):

* An instance runs *iterations*. Each iteration advances every decode member by one token and
  runs the slot's prefill work, if any. Iteration time is piecewise constant: it is recomputed
  from the cost model whenever the membership or the slot changes (the growth of the decode
  contexts within one segment is neglected; segments are short next to a context).
* The slot holds at most one prefill job. A *chunked* job (StartPrefill / Resume) runs one
  chunk per iteration on its whole SP group, synchronously; the decodes sharing those instances
  get one token per chunk (they stall while the chunk runs). A *colocated* job runs inside the
  host's decode iterations, `budget` prompt tokens per iteration.
* *Mixed* jobs (sarathi's Colocate with `mixed_batch_tokens`) take no slot: any number share
  the instance, and while one is in flight every iteration is stepped (`mixed_dt`): decodes
  first, then the mixed jobs in start order, each at most its chunk, until the budget.
* Instead of stepping iterations, the simulator only wakes an instance at its next milestone:
  the first decode member to finish or the end of a colocated prefill (`next_milestone_s`).
  `it`, the fractional count of iterations done, is brought up to date lazily by `sync`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from controlplane.core.types import SpKind
from sim.cost_model import CostModel, causal_pairs

INF = math.inf
EPS_IT = 1e-6  # iterations: a milestone this close counts as reached (float round-off)


@dataclass(slots=True, eq=False)
class PrefillJob:
    """A request's prefill on an SP group (chunked) or on a colocation host."""

    req: int  # request index
    group: tuple[int, ...]  # instance indices, rank order (one for colocation)
    prompt_tokens: int
    chunk_tokens: int
    num_chunks: int
    next_chunk: int  # index of the next chunk to run (== chunks done)
    decode_in_place: bool
    sp_kind: SpKind = SpKind.ULYSSES
    colocate_budget_tokens: int = 0  # > 0 marks a colocated job
    cross_node: bool = False  # SP group spans nodes
    running: bool = False  # holds its instances' slots now
    pause_pending: bool = False  # stop at the end of the chunk in flight
    chunk_duration_s: float = 0.0  # duration of the chunk in flight
    end_it: float = INF  # colocated: iteration count of the host when it completes
    seq: int = 0  # chunk generation, to drop stale completion events
    mixed_batch_tokens: int = 0  # > 0 marks a mixed job: its host's tokens per iteration
    done_tokens: int = 0  # mixed: prompt tokens prefilled so far
    step_tokens: int = 0  # mixed: prompt tokens in the iteration in flight

    @property
    def is_colocated(self) -> bool:
        """True when the job runs inside a host's decode iterations."""
        return self.colocate_budget_tokens > 0

    def chunk_bounds(self) -> tuple[int, int]:
        """(tokens, cached context tokens) of chunk `next_chunk`."""
        start = self.next_chunk * self.chunk_tokens
        return min(self.chunk_tokens, self.prompt_tokens - start), start


@dataclass(slots=True, eq=False)
class SimInstance:
    """One model instance (tp GPUs); mutable state owned by the engine."""

    index: int
    instance_id: str
    node: int
    cost: CostModel
    it: float = 0.0  # iterations done (fractional)
    t_ref: float = 0.0  # time `it` and `busy_s` are up to date to
    dt: float = INF  # current iteration duration; INF when idle
    busy_s: float = 0.0  # seconds with work (decode members or a prefill)
    slow_dt_s: float = INF  # an iteration longer than this is a slow token gap (the TBT SLO)
    slow_it: float = 0.0  # slow iterations done up to iteration `it_at_dt` (see `slow_now`)
    it_at_dt: float = 0.0  # `it` when `dt` was last set
    version: int = 0  # bumped on every change, to drop stale wake-ups
    slot: PrefillJob | None = None
    pending: list[PrefillJob] = field(default_factory=list)  # jobs waiting for the slot
    mixed: list[PrefillJob] = field(default_factory=list)  # mixed jobs, in start order
    mixed_dt: float = INF  # duration of the mixed iteration in flight (INF: none)
    mixed_seq: int = 0  # mixed iteration generation, to drop stale completion events
    mixed_start_s: float = -INF  # when the mixed iteration in flight started
    # Decode members: request -> (join iteration, context tokens at join, slow_it at join);
    # shadows (members of a group decode led by another instance) have no `finish_heap` entry.
    members: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    finish_heap: list[tuple[float, int]] = field(default_factory=list)  # (finish it, req)
    ctx_sum: float = 0.0  # Σ context at join over members
    join_sum: float = 0.0  # Σ join iteration over members

    def sync(self, now_s: float) -> None:
        """Advance `it` and `busy_s` to `now_s` at the current iteration duration."""
        elapsed = now_s - self.t_ref
        if elapsed > 0.0 and self.dt < INF:
            self.it += elapsed / self.dt
            self.busy_s += elapsed
        self.t_ref = now_s

    def slow_now(self) -> float:
        """Slow iterations done so far (call after `sync`): those booked when `dt` last
        changed, plus the ones since then if the current `dt` is slow."""
        if self.dt > self.slow_dt_s:
            return self.slow_it + (self.it - self.it_at_dt)
        return self.slow_it

    def decode_context_tokens(self) -> float:
        """Σ over members of their current context (prompt + tokens generated so far)."""
        return self.ctx_sum + len(self.members) * self.it - self.join_sum

    def add_member(self, req: int, context_tokens: float, remaining_tokens: int | None) -> None:
        """Join the decode batch (sync first); `remaining_tokens` None makes a shadow."""
        self.members[req] = (self.it, context_tokens, self.slow_now())
        self.ctx_sum += context_tokens
        self.join_sum += self.it
        if remaining_tokens is not None:
            heapq.heappush(self.finish_heap, (self.it + remaining_tokens, req))

    def remove_member(self, req: int) -> float:
        """Leave the decode batch (sync first); its heap entry is dropped lazily. Returns the
        slow iterations (longer than `slow_dt_s`) run while `req` was a member."""
        joined, context, slow_at_join = self.members.pop(req)
        self.ctx_sum -= context
        self.join_sum -= joined
        if not self.members:  # re-anchor so float drift cannot accumulate
            self.ctx_sum = self.join_sum = 0.0
        return self.slow_now() - slow_at_join

    def pop_finished(self) -> list[int]:
        """Members whose last token is done by now (call after `sync`)."""
        done: list[int] = []
        heap = self.finish_heap
        while heap and heap[0][0] <= self.it + EPS_IT:
            _, req = heapq.heappop(heap)
            if req in self.members:
                done.append(req)
        return done

    def recompute(self) -> None:
        """Set the iteration duration for the current slot and members (sync first)."""
        self.version += 1
        if self.dt > self.slow_dt_s:  # book the iterations run at the old, slow duration
            self.slow_it += self.it - self.it_at_dt
        self.it_at_dt = self.it
        batch = len(self.members)
        job = self.slot
        cost = self.cost
        if self.mixed_dt < INF:
            self.dt = self.mixed_dt
        elif job is not None and not job.is_colocated:
            self.dt = job.chunk_duration_s
        elif job is not None:
            iters = math.ceil(job.prompt_tokens / job.colocate_budget_tokens)
            piece = job.prompt_tokens / iters
            pairs = causal_pairs(job.prompt_tokens, 0) / iters
            self.dt = cost.iteration_s(
                int(round(piece)),
                pairs,
                job.prompt_tokens / 2.0,
                1,
                batch,
                self.decode_context_tokens(),
            )
        elif batch:
            self.dt = cost.decode_s(batch, self.decode_context_tokens())
        else:
            self.dt = INF

    def next_milestone_s(self) -> float:
        """When the next member finishes or the colocated prefill ends (INF: nothing due)."""
        if self.dt == INF:
            return INF
        target = INF
        heap = self.finish_heap
        while heap and heap[0][1] not in self.members:
            heapq.heappop(heap)
        if heap:
            target = heap[0][0]
        job = self.slot
        if job is not None and job.is_colocated:
            target = min(target, job.end_it)
        if target == INF:
            return INF
        return self.t_ref + max(0.0, target - self.it) * self.dt
