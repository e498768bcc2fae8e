"""`ChunkTimeEstimator` on hand-built chunk times, and PecSched sizing a long's chunks from the
chunk times it observed (`long_chunk_target_s`)."""

from __future__ import annotations

import math

import pytest
from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane

from controlplane.core import actions as act
from controlplane.core.chunk_timing import SAMPLE_WEIGHT, ChunkClass, ChunkTimeEstimator
from controlplane.core.config import SchedulerConfig
from controlplane.core.errors import InvalidArgumentError

A100 = ChunkClass(tp=1, kv_capacity_tokens=500_000)
A100X4 = ChunkClass(tp=4, kv_capacity_tokens=800_000)


def test_the_prior_budget_holds_until_a_class_is_observed() -> None:
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, 2.0, 1000, 100_000, 1)

    assert est.budget_pairs(A100X4) == 123
    assert est.seconds_per_pair(A100X4) is None


def test_budget_is_the_target_time_over_the_seconds_per_pair() -> None:
    # 1,000 tokens ending at 100K on one instance: 1e8 pairs in 2 s
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, 2.0, 1000, 100_000, 1)

    assert est.seconds_per_pair(A100) == pytest.approx(2e-8)
    assert est.budget_pairs(A100) == 50_000_000


def test_sp_degree_splits_the_pairs_among_the_group() -> None:
    # the same chunk on 4 instances in 0.5 s: each holds 2.5e7 pairs
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, 0.5, 1000, 100_000, 4)

    assert est.seconds_per_pair(A100) == pytest.approx(2e-8)


def test_later_chunks_move_the_ratio_of_running_means() -> None:
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, 2.0, 1000, 100_000, 1)  # 1e8 pairs
    est.chunk_ran(A100, 1.0, 1000, 200_000, 1)  # 2e8 pairs

    seconds = 2.0 + SAMPLE_WEIGHT * (1.0 - 2.0)
    pairs = 1e8 + SAMPLE_WEIGHT * (2e8 - 1e8)
    assert est.seconds_per_pair(A100) == pytest.approx(seconds / pairs)


def test_a_chunk_at_the_prompt_start_counts_its_own_pairs() -> None:
    # context end below the chunk (cannot be: taken as the chunk itself)
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, 1.0, 1000, 10, 1)

    assert est.seconds_per_pair(A100) == pytest.approx(1e-6)


def test_ill_formed_samples_are_ignored() -> None:
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.chunk_ran(A100, math.nan, 1000, 100_000, 1)
    est.chunk_ran(A100, -1.0, 1000, 100_000, 1)
    est.chunk_ran(A100, 1.0, 0, 100_000, 1)
    est.prefill_chunk_ran(A100, 1.0, 10_000, 3, 3, 1)  # no chunk 3 of 3

    assert est.budget_pairs(A100) == 123


def test_prefill_chunk_ran_derives_the_chunk_and_its_end() -> None:
    # 10,000 tokens in 3 chunks of 3,334: the last one is 3,332 tokens ending at 10,000
    est = ChunkTimeEstimator(target_s=1.0, prior_budget_pairs=123)
    est.prefill_chunk_ran(A100, 1.0, 10_000, 3, 2, 1)

    assert est.seconds_per_pair(A100) == pytest.approx(1.0 / (3332 * 10_000))


@pytest.mark.parametrize(("target_s", "prior"), [(0.0, 1), (math.inf, 1), (1.0, 0)])
def test_bad_settings_are_refused(target_s: float, prior: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        ChunkTimeEstimator(target_s, prior)


def test_config_refuses_a_non_positive_target() -> None:
    with pytest.raises(InvalidArgumentError, match="long_chunk_target_s"):
        SchedulerConfig(long_chunk_target_s=0.0)


def _second_long_chunk(target_s: float | None) -> int:
    """The chunk of a 2nd 100K-token long, placed after the 1st ran all its chunks (each
    takes one step, 1 s, on the fake data plane) on one of two instances."""
    instances = [make_instance(f"g{k}", kv_capacity_tokens=200_000) for k in range(2)]
    policy = make_policy(
        "pecsched",
        instances=instances,
        long_chunk_target_s=target_s,
        widen_sp_when_idle=False,
        disaggregation=False,
    )
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long1", prompt_tokens=100_000, max_new_tokens=1))
    (first,) = dp.step().actions
    assert isinstance(first, act.StartPrefill) and first.sp_degree == 1
    while "long1" in dp.jobs:
        dp.step()
    dp.submit(make_request("long2", prompt_tokens=100_000, max_new_tokens=1))
    (second,) = dp.step().actions
    assert isinstance(second, act.StartPrefill) and first.chunk_tokens == 2560
    return second.chunk_tokens


def test_pecsched_sizes_chunks_for_the_target_time_from_observed_chunks() -> None:
    # 2,560-token chunks (the configured budget at 100K) took 1 s each on the fake data plane;
    # the ratio of means over chunks 1..38 (chunk 0 has no start mark, the last one ends the
    # prefill: no PrefillChunkDone) prices a pair, and the chunk whose last one takes the
    # target follows
    chunk, prompt = 2560, 100_000
    est = ChunkTimeEstimator(1.0, 1)
    for index in range(1, 39):
        est.prefill_chunk_ran(A100, 1.0, prompt, 40, index, 1)
    per_pair = est.seconds_per_pair(A100)
    assert per_pair is not None
    expected = {t: math.floor(t / per_pair) // prompt for t in (0.5, 4.0)}
    assert expected[0.5] < chunk < SchedulerConfig().chunk_tokens

    assert _second_long_chunk(0.5) == expected[0.5]
    assert _second_long_chunk(4.0) == min(SchedulerConfig().chunk_tokens, expected[4.0])
    assert _second_long_chunk(None) == chunk  # off: the configured budget
