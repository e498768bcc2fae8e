"""Faults on a live cluster: an agent SIGKILLed mid-run, the control plane SIGKILLed and restarted.

Durability contract (docs/architecture.md): after an agent dies its requests are re-queued and finish
elsewhere; after a control-plane restart on the same database every acknowledged request
finishes. Outputs must still equal transformers' greedy output (a resumed request continues
from its generated tokens, a re-run one starts over: both must give the same tokens).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_cluster import Cluster, Reference, prompt_ids, start_cluster, tiny_agent
from waiting import wait_until

from sdk.types import GenerateResult, RequestInfo, RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OUTPUT_TOKENS = 300

FINAL = ("finished", "cancelled", "failed")  # request states in the database


def _runs_on(info: RequestInfo, prefix: str) -> bool:
    """The request is prefilling or decoding on an instance of `prefix` (both last a while,
    unlike a KV transfer); a decode runs on the last instance."""
    if info.state is RequestState.DECODING:
        return info.instance_ids[-1].startswith(prefix)
    active = (RequestState.PREFILLING, RequestState.PAUSED)
    return info.state in active and any(i.startswith(prefix) for i in info.instance_ids)


def _settled_states(cluster: Cluster, timeout_s: float = 10.0) -> dict[str, str]:
    """Request states in the database once none is active (fails after `timeout_s`)."""

    def settled() -> dict[str, str]:
        states = dict(cluster.query("SELECT id, state FROM requests"))
        return states if all(s in FINAL for s in states.values()) else {}

    return wait_until(settled, "every request settled in the database", timeout_s)


def test_agent_sigkill_requests_finish_on_the_other_agent(
    tmp_path: Path, reference: Reference
) -> None:
    # Prepare
    cluster = start_cluster(
        tmp_path,
        (
            tiny_agent("node-a", ("general", "short_decode")),
            tiny_agent("node-b", ("general", "short_decode")),
        ),
    )
    prompts = [prompt_ids(700 + i, 80 + 40 * i) for i in range(8)]
    try:
        with cluster.client() as client:
            ids = [client.submit(p, max_new_tokens=OUTPUT_TOKENS).request_id for p in prompts]
            victims = wait_until(
                lambda: [rid for rid in ids if _runs_on(client.get(rid), "node-a/")],
                "a request running on node-a",
                60,
            )

            # Execute
            cluster.local.kill_agent("node-a")
            results = [client.result(rid, timeout_s=240) for rid in ids]
        db_states = _settled_states(cluster)
        events = cluster.events(ids)
    finally:
        cluster.local.stop()

    # Assert
    for prompt, result in zip(prompts, results, strict=True):
        assert result.state is RequestState.FINISHED, (result.request_id, result.error)
        assert list(result.token_ids) == reference.greedy(prompt, OUTPUT_TOKENS), result.request_id
    # The database (what a restarted control plane recovers from) agrees with the streams.
    assert db_states == dict.fromkeys(ids, "finished"), db_states
    # The kill hit running work: it was requeued and last placed on the surviving agent.
    requeued = sorted({r for r, k, _, _ in events if k == "requeued"})
    assert requeued, f"the kill affected no request (seen on node-a before it: {victims})"
    for rid in requeued:
        placed_on = [
            i
            for r, k, i, _ in events
            if r == rid and i and k in ("prefill_started", "colocated", "decode_started")
        ]
        assert placed_on and placed_on[-1].startswith("node-b/"), (rid, placed_on)


def test_controlplane_sigkill_restart_every_acknowledged_request_finishes(
    tmp_path: Path, reference: Reference
) -> None:
    # Prepare
    cluster = start_cluster(
        tmp_path, (tiny_agent("node-a", ("general", "general", "short_decode")),)
    )
    # Eight shorts and one long that fits one worker (SP is covered by test_cluster_features).
    prompts = [prompt_ids(800 + i, 60 + 50 * i) for i in range(8)] + [prompt_ids(899, 1500)]
    outputs = [OUTPUT_TOKENS] * 8 + [40]
    try:
        with cluster.client() as client, ThreadPoolExecutor(len(prompts)) as pool:
            acks = [
                client.submit(p, max_new_tokens=n) for p, n in zip(prompts, outputs, strict=True)
            ]
            # Token streams open across the restart: the SDK must resume each one.
            futures = [pool.submit(client.result, a.request_id, timeout_s=240) for a in acks]
            wait_until(
                lambda: sum(client.get(a.request_id).output_tokens for a in acks) >= 20,
                "20 tokens decoded before the restart",
                60,
            )

            # Execute
            cluster.local.kill_controlplane()
            time.sleep(1.0)  # the outage itself (the scenario, not a wait): streams retry
            cluster.local.start_controlplane()
            cluster.local.wait_ready(3, timeout_s=120)
            results: list[GenerateResult] = [f.result() for f in futures]
            finals = [client.get(a.request_id) for a in acks]
    finally:
        cluster.local.stop()

    # Assert
    for prompt, n, result, info in zip(prompts, outputs, results, finals, strict=True):
        assert info.state is RequestState.FINISHED, (info.request_id, info.state, info.error)
        assert result.state is RequestState.FINISHED, (result.request_id, result.error)
        assert list(result.token_ids) == reference.greedy(prompt, n), result.request_id
