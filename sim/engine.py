"""Deterministic discrete-event engine driving a `controlplane.core` policy.

The loop is the runtime's loop with a simulated clock: take every event due at the earliest
time (heap keyed by (time, kind priority, seq), arrivals merged from the sorted workload), hand
them to `policy.observe`, call `policy.schedule(now_s)` once, and carry the Decision's actions
out through `sim.execution.Executor` on simulated instances (`sim.instances`), whose costs
come from `sim.cost_model`. Nothing
depends on wall time or hash order, so the same inputs give the same run.

Reporting: `TokensGenerated(1)` with `PrefillDone` (the first token), `TokensGenerated(rest)`
right before `RequestFinished`; no per-token events. Each request's token gaps longer than
`tbt_slo_s` are counted (`RequestRecords.tbt_gaps_over_slo`) from the instances' slow
iterations, so SLO attainment needs no per-token work either. A periodic tick (`tick_s`) calls
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

from controlplane.core import events as ev
from controlplane.core.policy import Policy
from controlplane.core.types import (
    InstanceRole,
    InstanceSpec,
    RequestClass,
    RequestSpec,
    classify,
)
from sim.cost_model import CostModel
from sim.execution import Executor
from sim.instances import INF
from sim.metrics import DEFAULT_SLO_TBT_S, RequestRecords


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
    """One simulation of a workload on `cluster` under `policy` (use `run`)."""

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
        tbt_slo_s: float = DEFAULT_SLO_TBT_S,
    ) -> None:
        self.cost = cluster.cost
        self.policy = policy
        self.arrival: list[float] = arrival_s.tolist()
        prompt: list[int] = prompt_tokens.tolist()
        output: list[int] = output_tokens.tolist()
        self.tbt_slo_s = tbt_slo_s  # token gaps above this are counted per request
        self.x = Executor(
            cluster.cost, cluster.num_instances, prompt, output, log_decisions, tbt_slo_s
        )
        threshold = policy.config.short_threshold_tokens
        self.is_long = [classify(p, threshold) is RequestClass.LONG for p in prompt]
        self.isolated = [
            isolated_jct(p, o) if long else math.nan
            for p, o, long in zip(prompt, output, self.is_long, strict=True)
        ]
        self.tick_s = tick_s
        self.max_idle_s = max_idle_s
        self.batch_window_s = batch_window_s
        self.num_events = 0
        self._n = len(self.arrival)  # requests in the workload
        self._next_arrival = 0  # index of the next request to arrive (run)
        self._idle_since = INF  # when the engine last had only ticks to process (run)

    def run(self) -> SimRun:
        """Simulate until every request is terminal and nothing is in flight."""
        policy, x = self.policy, self.x
        policy.observe(self._instances_up())
        self._next_arrival = 0
        self._idle_since = INF
        calls = 0
        policy_wall = 0.0
        now = 0.0
        while (at_s := self._next_round_s(now)) is not None:
            now = at_s
            self._take_due(now)
            events, x.out = x.out, []
            start = time.perf_counter()
            if events:
                policy.observe(events)
            decision = policy.schedule(now)
            policy_wall += time.perf_counter() - start
            calls += 1
            for action in decision.actions:
                x.apply(action, now)
            if calls % 4096 == 0:
                policy.take_completed()
        for inst in x.instances:
            inst.sync(now)
        busy = sum(inst.busy_s for inst in x.instances) * self.cost.tp
        return SimRun(
            self._records(),
            busy,
            now,
            self.num_events,
            calls,
            policy_wall,
            tuple(x.log) if x.log is not None else (),
        )

    def _instances_up(self) -> list[ev.Event]:
        """InstanceUp at 0 for every simulated instance, all GENERAL."""
        cost = self.cost
        return [
            ev.InstanceUp(
                InstanceSpec(
                    inst.instance_id,
                    f"node{inst.node:04d}",
                    InstanceRole.GENERAL,
                    cost.tp,
                    cost.kv_capacity_tokens,
                ),
                0.0,
            )
            for inst in self.x.instances
        ]

    def _next_round_s(self, now: float) -> float | None:
        """When the next observe/schedule round happens (at a window's end when batching), or
        None to stop: nothing left, or only ticks for longer than `max_idle_s` (stuck)."""
        x, heap, nxt = self.x, self.x.heap, self._next_arrival
        x.drop_stale()
        t_next = min(heap[0].at_s if heap else INF, self.arrival[nxt] if nxt < self._n else INF)
        if x.active > 0:
            if t_next == INF:
                self._idle_since = min(self._idle_since, now)
                if now - self._idle_since > self.max_idle_s:
                    return None  # only ticks for a long while: the policy is stuck
            else:
                self._idle_since = INF
            t_next = min(t_next, now + self.tick_s)
        if t_next == INF:
            return None
        window = self.batch_window_s
        return max(now, math.ceil(t_next / window) * window) if window > 0 else t_next

    def _take_due(self, now: float) -> None:
        """Handle the completions due by `now`, then the arrivals (as RequestArrived)."""
        x, heap = self.x, self.x.heap
        while heap and heap[0].at_s <= now:
            self.num_events += 1
            x.handle(heapq.heappop(heap))
        arrival, nxt = self.arrival, self._next_arrival
        while nxt < self._n and arrival[nxt] <= now:
            t = arrival[nxt]
            spec = RequestSpec(str(nxt), "sim", x.prompt[nxt], x.output[nxt], 0, t)
            x.out.append(ev.RequestArrived(spec, t))
            self.num_events += 1
            x.active += 1
            nxt += 1
        self._next_arrival = nxt

    def _records(self) -> RequestRecords:
        x = self.x
        return RequestRecords(
            is_long=np.array(self.is_long, dtype=np.bool_),
            arrival_s=np.array(self.arrival, dtype=np.float64),
            first_scheduled_s=np.array(x.first_sched, dtype=np.float64),
            first_token_s=np.array(x.first_token, dtype=np.float64),
            finished_s=np.array(x.finished, dtype=np.float64),
            output_tokens=np.array(x.output, dtype=np.int64),
            preemptions=np.array(x.preempt, dtype=np.int64),
            isolated_jct_s=np.array(self.isolated, dtype=np.float64),
            tbt_gaps_over_slo=np.array(x.gaps_over_slo, dtype=np.int64),
            tbt_slo_s=self.tbt_slo_s,
        )
