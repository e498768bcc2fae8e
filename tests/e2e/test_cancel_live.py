"""Cancelling a request during prefill, KV transfer and decode frees its KV on every worker.

Freed memory is checked twice: the cluster reports no KV in use, and then requests that need
every general worker's whole KV pool (and the short-decode worker's) still run and finish
correctly, which the workers' memory accountants would refuse if any KV had leaked.
"""

from __future__ import annotations

import time

import pytest
from e2e_cluster import (
    KV_BUDGET_TOKENS,
    TERMINAL,
    Cluster,
    Reference,
    prompt_ids,
    wait_for,
    wait_idle,
)

from sdk.types import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_RUNNING = (RequestState.QUEUED, RequestState.PREFILLING)


def test_cancel_during_sp_prefill(tiny_cluster: Cluster) -> None:
    with tiny_cluster.client() as client:
        # Prepare
        rid = client.submit(prompt_ids(400, 4500), max_new_tokens=20).request_id
        info = wait_for(
            client, rid, lambda i: i.chunks_done >= 1 or i.state not in _RUNNING, timeout_s=60
        )
        assert info.state is RequestState.PREFILLING, info

        # Execute
        client.cancel(rid)
        final = wait_for(client, rid, lambda i: i.state in TERMINAL, timeout_s=30)

    # Assert
    assert final.state is RequestState.CANCELLED, final
    assert len(info.instance_ids) >= 2, f"expected an SP group: {info.instance_ids}"
    kinds = [k for _, k, _, _ in tiny_cluster.events([rid])]
    assert "cancelled" in kinds and "prefill_done" not in kinds, kinds
    wait_idle(tiny_cluster)


def test_cancel_during_decode(tiny_cluster: Cluster) -> None:
    with tiny_cluster.client() as client:
        # Prepare
        rid = client.submit(prompt_ids(401, 100), max_new_tokens=1900).request_id
        wait_for(
            client,
            rid,
            lambda i: (
                (i.state is RequestState.DECODING and i.output_tokens >= 5) or i.state in TERMINAL
            ),
            timeout_s=60,
        )

        # Execute
        client.cancel(rid)
        final = wait_for(client, rid, lambda i: i.state in TERMINAL, timeout_s=30)

    # Assert
    assert final.state is RequestState.CANCELLED and final.output_tokens < 1900, final
    wait_idle(tiny_cluster)


def test_cancel_during_kv_transfer(tiny_cluster: Cluster) -> None:
    # Prepare: shorts just under the long threshold have the largest KV to move.
    caught: list[str] = []
    seen: list[RequestState] = []
    with tiny_cluster.client() as client:
        for attempt in range(20):
            rid = client.submit(prompt_ids(500 + attempt, 1000), max_new_tokens=40).request_id
            deadline = time.monotonic() + 60
            info = client.get(rid)
            while info.state in _RUNNING and time.monotonic() < deadline:
                info = client.get(rid)
            seen.append(info.state)
            if info.state is RequestState.TRANSFERRING_KV:
                # Execute
                client.cancel(rid)
                caught.append(rid)
                break
            client.cancel(rid)
        finals = [wait_for(client, r, lambda i: i.state in TERMINAL, timeout_s=30) for r in caught]

    # Assert
    assert caught, f"never saw a request in TRANSFERRING_KV (states after prefill: {seen})"
    assert finals[0].state is RequestState.CANCELLED, finals[0]
    kinds = [k for _, k, _, _ in tiny_cluster.events(caught)]
    assert "kv_transfer_started" in kinds and "cancelled" in kinds, kinds
    wait_idle(tiny_cluster)


def test_whole_kv_pools_usable_after_cancellations(
    tiny_cluster: Cluster, reference: Reference
) -> None:
    # Prepare: a long request needing all three general pools, a short filling the decode pool.
    long_prompt = prompt_ids(600, 3 * KV_BUDGET_TOKENS - 200)
    short_prompt = prompt_ids(601, 1000)
    short_output = KV_BUDGET_TOKENS - 1000 - 8

    # Execute
    with tiny_cluster.client() as client:
        long_id = client.submit(long_prompt, max_new_tokens=16).request_id
        long_result = client.result(long_id, timeout_s=180)
        short_id = client.submit(short_prompt, max_new_tokens=short_output).request_id
        short_result = client.result(short_id, timeout_s=180)

    # Assert
    assert long_result.state is RequestState.FINISHED, long_result
    assert list(long_result.token_ids) == reference.greedy(long_prompt, 16)
    assert short_result.state is RequestState.FINISHED, short_result
    assert list(short_result.token_ids) == reference.greedy(short_prompt, short_output)
    wait_idle(tiny_cluster)
