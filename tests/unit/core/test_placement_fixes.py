"""Placement fixes from live runs and the simulator: no head-of-line blocking among KV
transfers, refusals remembered per instance, bounded chunk work, an elastic pool that
shrinks, and the duty cycle of protected long prefills."""

from __future__ import annotations

from builders import make_instance, make_policy, make_request
from fake_dataplane import FakeDataPlane, check_invariants

from controlplane.core.types import InstanceRole

SD = InstanceRole.SHORT_DECODE


def _transfers(dp: FakeDataPlane, request_id: str) -> list[str]:
    return [
        line for line in dp.log if " TransferKV(" in line and f"request_id='{request_id}'" in line
    ]


def test_a_transfer_that_does_not_fit_does_not_block_one_that_does() -> None:
    # Prepare: d0 (5000 KV tokens) holds a long-decoding short of 3100 tokens
    instances = [
        make_instance("g0"),
        make_instance("g1"),
        make_instance("d0", role=SD, kv_capacity_tokens=5000),
    ]
    policy = make_policy("pecsched", instances=instances, short_decode_elastic=False)
    dp = FakeDataPlane(policy, tokens_per_step=1)
    dp.submit(make_request("busy", prompt_tokens=3000, max_new_tokens=100))
    for _ in range(4):
        dp.step()
    assert policy.request_view("busy").decode_instance_ids == ("d0",)

    # Execute: "big" (2000 tokens) cannot fit d0 now; "small" (110) can; big is ahead
    dp.submit(make_request("big", prompt_tokens=1500, max_new_tokens=500, arrival_s=dp.now_s))
    dp.submit(make_request("small", prompt_tokens=100, max_new_tokens=10, arrival_s=dp.now_s))
    for _ in range(3):
        dp.step()
        check_invariants(policy, dp.now_s)

    # Assert: small went to d0 past the waiting big
    assert len(_transfers(dp, "small")) == 1
    assert not _transfers(dp, "big")
