"""The four PecSched techniques on a live 4-worker cluster, with transformers-exact outputs.

One long request (4,500 prompt tokens, more than two workers' KV) must prefill with SP over three
general instances in 128-token chunks. Shorts that arrive during its prefill preempt it (it
pauses at a chunk boundary and later resumes); shorts that arrive during its decode are
colocated on its instances; every short's KV goes to the short-decode worker. Each technique is
asserted from `request_events` in the database, and every output equals transformers' greedy
output on the same weights.
"""

from __future__ import annotations

import pytest
from e2e_cluster import TERMINAL, Cluster, Reference, prompt_ids, wait_for, wait_idle

from sdk.types import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG_PROMPT_TOKENS = 4500  # > 2 x 2048-token KV per worker: an SP group of 3
LONG_OUTPUT_TOKENS = 300  # decode long enough for shorts to arrive and colocate
SHORT_OUTPUT_TOKENS = 12


def test_preemption_colocation_kv_transfer_and_sp_prefill(
    tiny_cluster: Cluster, reference: Reference
) -> None:
    # Prepare
    long_prompt = prompt_ids(100, LONG_PROMPT_TOKENS)
    during_prefill = [prompt_ids(200 + i, 150 + 20 * i) for i in range(3)]
    during_decode = [prompt_ids(300 + i, 120 + 10 * i) for i in range(3)]
    expected: dict[str, tuple[list[int], int]] = {}

    # Execute
    with tiny_cluster.client() as client:
        long_id = client.submit(long_prompt, max_new_tokens=LONG_OUTPUT_TOKENS).request_id
        expected[long_id] = (long_prompt, LONG_OUTPUT_TOKENS)
        info = wait_for(
            client,
            long_id,
            lambda i: (
                i.chunks_done >= 1 or i.state not in (RequestState.QUEUED, RequestState.PREFILLING)
            ),
            timeout_s=60,
        )
        assert info.state is RequestState.PREFILLING, f"long prefill not observed running: {info}"
        assert info.chunks_done < info.chunks_total - 3, f"long prefill almost done already: {info}"
        prefill_ids = []
        for prompt in during_prefill:
            rid = client.submit(prompt, max_new_tokens=SHORT_OUTPUT_TOKENS).request_id
            prefill_ids.append(rid)
            expected[rid] = (prompt, SHORT_OUTPUT_TOKENS)
        info = wait_for(
            client,
            long_id,
            lambda i: i.state is RequestState.DECODING or i.state in TERMINAL,
            timeout_s=120,
        )
        assert info.state is RequestState.DECODING, f"long request not decoding: {info}"
        assert info.output_tokens < LONG_OUTPUT_TOKENS - 50, f"long decode almost done: {info}"
        decode_ids = []
        for prompt in during_decode:
            rid = client.submit(prompt, max_new_tokens=SHORT_OUTPUT_TOKENS).request_id
            decode_ids.append(rid)
            expected[rid] = (prompt, SHORT_OUTPUT_TOKENS)
        results = {rid: client.result(rid, timeout_s=180) for rid in expected}

    # Assert: outputs
    for rid, (prompt, num_tokens) in expected.items():
        result = results[rid]
        assert result.state is RequestState.FINISHED, f"{rid}: {result.state} {result.error}"
        want = reference.greedy(prompt, num_tokens)
        assert len(set(want)) >= 3, "degenerate reference"
        assert list(result.token_ids) == want, f"{rid} ({len(prompt)} tokens) differs"

    # Assert: the techniques, from the database
    events = tiny_cluster.events(list(expected))
    kinds = {rid: [k for r, k, _, _ in events if r == rid] for rid in expected}
    long_starts = [d for r, k, _, d in events if r == long_id and k == "prefill_started"]
    assert long_starts and max(int(d.get("sp_degree", 1)) for d in long_starts) >= 2, long_starts
    long_instances = {i for r, k, i, _ in events if r == long_id and k == "prefill_chunk_done"}
    assert len(long_instances) >= 2 or int(long_starts[0]["sp_degree"]) >= 2
    assert "paused" in kinds[long_id] and "resumed" in kinds[long_id], kinds[long_id]
    assert any("colocated" in kinds[rid] for rid in decode_ids), {r: kinds[r] for r in decode_ids}
    for rid in prefill_ids + decode_ids:
        assert "kv_transfer_done" in kinds[rid], (rid, kinds[rid])
    history = tiny_cluster.query(
        f"SELECT request_id, preemptions FROM request_history WHERE request_id = '{long_id}'"
    )
    assert history and history[0][1] >= 1, history
    wait_idle(tiny_cluster)
