"""PecSched's chunk size of a widened SP group: the chunk of the fewest instances that hold the
long's KV, not of the group's width, so a short preempting the group waits for a shorter
chunk."""

from __future__ import annotations

from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane

from controlplane.core import actions as act
from controlplane.core.config import SchedulerConfig
from controlplane.core.policies.pecsched import kv_base_degree


def _long_start(widen: bool, num_instances: int = 6) -> act.StartPrefill:
    """The StartPrefill of a 150K-token long on `num_instances` idle 100K-token instances."""
    instances = [make_instance(f"g{k}", kv_capacity_tokens=100_000) for k in range(num_instances)]
    policy = make_policy("pecsched", instances=instances, widen_sp_when_idle=widen)
    dp = FakeDataPlane(policy)
    dp.submit(make_request("long", prompt_tokens=150_000, max_new_tokens=10))
    (start,) = dp.step().actions
    assert isinstance(start, act.StartPrefill)
    return start


def test_widened_group_keeps_the_chunk_of_the_instances_that_hold_its_kv() -> None:
    # Prepare: the chunk rule of the default config at 2 instances (what holds 150K + 10)
    config = SchedulerConfig()
    at_base = config.prefill_chunk_tokens(150_000, 2)
    at_width = config.prefill_chunk_tokens(150_000, 5)
    assert at_base < at_width  # the width's budget would allow a larger chunk

    # Execute
    widened, plain = _long_start(widen=True), _long_start(widen=False)

    # Assert: widened over five instances (one left open), chunked as on two
    assert (widened.sp_degree, plain.sp_degree) == (5, 2)
    assert widened.chunk_tokens == plain.chunk_tokens == at_base
    assert widened.num_chunks == -(-150_000 // at_base)


def test_group_of_its_base_size_keeps_the_configured_chunk() -> None:
    # Prepare: two instances only, both needed for the KV (nothing to widen)
    start = _long_start(widen=True, num_instances=2)

    # Assert
    assert start.sp_degree == 2
    assert start.chunk_tokens == SchedulerConfig().prefill_chunk_tokens(150_000, 2)


def test_kv_base_degree_counts_the_fewest_instances_holding_the_need() -> None:
    assert kv_base_degree([100, 50, 30], 100) == 1
    assert kv_base_degree([100, 50, 30], 120) == 2
    assert kv_base_degree([100, 50, 30], 180) == 3
    assert kv_base_degree([100, 50, 30], 500) == 3  # none hold it: the whole group
