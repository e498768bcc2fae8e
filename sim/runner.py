"""Run one workload under one or more policies and summarise each run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from controlplane.core.config import SchedulerConfig
from controlplane.core.policies.registry import make_policy
from controlplane.core.policy import Policy
from sim.cost_model import CostModel
from sim.engine import ClusterSpec, Engine, SimRun
from sim.metrics import (
    DEFAULT_SLO_TBT_S,
    DEFAULT_SLO_TTFT_S,
    DEFAULT_STARVATION_FACTOR,
    summarize,
)
from sim.report import PolicyResult
from sim.workloads import Workload


@dataclass(frozen=True, slots=True)
class Outcome:
    """A policy's summarised result and the raw run behind it."""

    result: PolicyResult
    run: SimRun


def isolated_jct_fn(cost: CostModel, config: SchedulerConfig) -> Callable[[int, int], float]:
    """JCT of a request alone on an idle cluster: chunked prefill on the fewest instances that
    hold its KV (Ulysses SP when more than one), then decode alone on that group."""

    @lru_cache(maxsize=65536)
    def isolated(prompt_tokens: int, output_tokens: int) -> float:
        total = prompt_tokens + output_tokens
        k = max(1, math.ceil(total / cost.kv_capacity_tokens))
        chunk = config.chunk_tokens
        prefill = 0.0
        for start in range(0, prompt_tokens, chunk):
            tokens = min(chunk, prompt_tokens - start)
            prefill += cost.sp_prefill_s(tokens, start, k, "ulysses", k * cost.tp > 8)
        decode = (output_tokens - 1) * cost.decode_s(1, (prompt_tokens + output_tokens / 2) / k)
        return prefill + decode

    return isolated


def run_policy(
    workload: Workload,
    cluster: ClusterSpec,
    policy: str | Policy,
    config: SchedulerConfig,
    seed: int = 0,
    log_decisions: bool = False,
    starvation_factor: float = DEFAULT_STARVATION_FACTOR,
    batch_window_s: float = 0.0,
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
    slo_tbt_s: float = DEFAULT_SLO_TBT_S,
) -> Outcome:
    """Simulate `workload` under `policy` (a registry name, or a built policy) and summarise;
    `seed` seeds the policy's tie-breaks and is recorded in the result."""
    if isinstance(policy, str):
        built = make_policy(policy, config=config, rng=seed)
    else:
        built = policy
    started = time.perf_counter()
    engine = Engine(
        cluster,
        built,
        workload.arrival_s,
        workload.prompt_tokens,
        workload.output_tokens,
        isolated_jct_fn(cluster.cost, built.config),
        log_decisions=log_decisions,
        batch_window_s=batch_window_s,
        tbt_slo_s=slo_tbt_s,
    )
    run = engine.run()
    wall = time.perf_counter() - started
    summary = summarize(
        run.records, run.busy_gpu_s, cluster.num_gpus, run.end_s, starvation_factor, slo_ttft_s
    )
    result = PolicyResult(
        built.name, summary, wall, run.schedule_calls, run.policy_wall_s, run.num_events, seed
    )
    return Outcome(result, run)


def isolated_prefill_gpu_s(cost: CostModel, config: SchedulerConfig, prompt_tokens: int) -> float:
    """GPU-seconds of one prefill alone on the fewest instances that hold its prompt's KV."""
    k = max(1, math.ceil(prompt_tokens / cost.kv_capacity_tokens))
    total = 0.0
    for start in range(0, prompt_tokens, config.chunk_tokens):
        tokens = min(config.chunk_tokens, prompt_tokens - start)
        total += cost.sp_prefill_s(tokens, start, k, "ulysses", k * cost.tp > 8)
    return total * k * cost.tp


def prefill_load(
    workload: Workload, cost: CostModel, config: SchedulerConfig, num_gpus: int
) -> float:
    """Offered prefill load: Σ isolated prefill GPU-seconds / (trace span x GPUs).

    1.0 means the prefills alone would keep every GPU busy for the whole trace; decode work
    comes on top, so contention starts well below 1.
    """
    cache: dict[int, float] = {}
    total = 0.0
    for p in workload.prompt_tokens.tolist():
        if p not in cache:
            cache[p] = isolated_prefill_gpu_s(cost, config, p)
        total += cache[p]
    return total / (workload.duration_s * num_gpus)
