"""An SP group whose members are on two nodes: two agents on this host act as two nodes
(own node ids, rendezvous stores and worker processes) under the real control plane.

The long request needs the KV of three workers, so its SP group takes both general workers
of node-a and the one of node-b; the members meet at node-a's store (gloo). A short that
arrives during the prefill pauses it on both nodes, and its KV goes to node-b's short-decode
worker. Every output equals transformers' greedy output on the same weights, and only rank
0's node reports the long request's progress.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_cluster import (
    Cluster,
    Reference,
    prompt_ids,
    start_cluster,
    tiny_agent,
    wait_for,
    wait_idle,
)

from sdk.types import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG_PROMPT_TOKENS = 4500  # > 2 x 2048-token KV per worker: an SP group of 3
LONG_OUTPUT_TOKENS = 40
SHORT_OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """node-a: 2 general workers; node-b: 1 general, 1 short-decode; pecsched."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("two-nodes"),
        (
            tiny_agent("node-a", ("general", "general")),
            tiny_agent("node-b", ("general", "short_decode")),
        ),
    )
    yield cluster
    cluster.local.stop()


def test_a_long_prefill_over_an_sp_group_spanning_two_nodes(
    two_nodes: Cluster, reference: Reference
) -> None:
    # Prepare
    long_prompt = prompt_ids(400, LONG_PROMPT_TOKENS)
    short_prompt = prompt_ids(401, 160)

    # Execute
    with two_nodes.client() as client:
        long_id = client.submit(long_prompt, max_new_tokens=LONG_OUTPUT_TOKENS).request_id
        info = wait_for(
            client,
            long_id,
            lambda i: (
                i.chunks_done >= 1 or i.state not in (RequestState.QUEUED, RequestState.PREFILLING)
            ),
            timeout_s=90,
        )
        assert info.state is RequestState.PREFILLING, f"long prefill not observed running: {info}"
        assert info.chunks_done < info.chunks_total - 3, f"long prefill almost done already: {info}"
        group = info.instance_ids
        short_id = client.submit(short_prompt, max_new_tokens=SHORT_OUTPUT_TOKENS).request_id
        long_result = client.result(long_id, timeout_s=240)
        short_result = client.result(short_id, timeout_s=60)

    # Assert: the group spans both nodes, rank 0 first (node-a)
    assert group == ("node-a/0", "node-a/1", "node-b/0"), group
    # Assert: outputs
    for result, prompt, num_tokens in (
        (long_result, long_prompt, LONG_OUTPUT_TOKENS),
        (short_result, short_prompt, SHORT_OUTPUT_TOKENS),
    ):
        assert result.state is RequestState.FINISHED, f"{result.state} {result.error}"
        assert list(result.token_ids) == reference.greedy(prompt, num_tokens)
    # Assert: paused and resumed across both nodes; progress only from rank 0
    events = two_nodes.events([long_id, short_id])
    long_kinds = [k for r, k, _, _ in events if r == long_id]
    assert "paused" in long_kinds and "resumed" in long_kinds, long_kinds
    assert {i for r, k, i, _ in events if r == long_id and k == "prefill_chunk_done"} == {
        "node-a/0"
    }
    assert "kv_transfer_done" in [k for r, k, _, _ in events if r == short_id]
    wait_idle(two_nodes)
