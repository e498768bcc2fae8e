"""`sarathi` on a live cluster: the policy's per-iteration token budget bounds the engine.

One tiny CPU worker started with `--max-batch-tokens 4096` serves a control plane whose
`sarathi_batch_tokens` is 48: the budget travels with each mixed prefill
(`Colocate.mixed_batch_tokens`), so no iteration runs more than 48 tokens while one prefills. Every
prompt above `sarathi_long_prefill_tokens` (32) takes at most 32 tokens per iteration (vLLM's
long_prefill_token_threshold); shorts submitted right after a long prompt join its iterations
(vLLM-v1 / Sarathi-Serve mixed batches), where the long's 32 tokens and a short's 32 would make 64:
the budget, not the chunk caps, bounds those iterations. Iterations are read from the chunk events
in `request_events` (each carries its worker iteration, that iteration's tokens and its own); every
output equals transformers'.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
from e2e_cluster import (
    KV_BUDGET_TOKENS,
    WEIGHT_SEED,
    Cluster,
    Reference,
    prompt_ids,
    start_cluster,
)

from pecsched.cluster import AgentSpec
from sdk.types import RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BATCH_TOKENS = 48  # the policy's budget (vLLM max_num_batched_tokens)
LONG_CAP_TOKENS = 32  # a prompt's tokens per iteration at most
ENGINE_BATCH_TOKENS = 4096  # the worker's own --max-batch-tokens, far above the budget
LONG_PROMPT_TOKENS = 3000  # LONG (>= 1,024): ~94 iterations of 32 tokens
SHORT_PROMPTS = (150, 100, 60)
OUTPUT_TOKENS = 12
SARATHI_TOML = f"""\
[scheduler]
short_threshold_tokens = 1024
sarathi_batch_tokens = {BATCH_TOKENS}
sarathi_long_prefill_tokens = {LONG_CAP_TOKENS}
"""


@pytest.fixture(scope="module")
def sarathi_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One agent, one general tiny worker with a larger engine budget than the policy's."""
    agent = AgentSpec(
        "node-s", ("general",), "tiny", "cpu", str(3 * KV_BUDGET_TOKENS), WEIGHT_SEED,
        ("--max-batch-tokens", str(ENGINE_BATCH_TOKENS)),
    )  # fmt: skip
    cluster = start_cluster(
        tmp_path_factory.mktemp("sarathi"), (agent,), policy="sarathi", config_toml=SARATHI_TOML
    )
    yield cluster
    cluster.local.stop()


def test_mixed_batches_stay_within_the_policys_budget(
    sarathi_cluster: Cluster, reference: Reference
) -> None:
    # Prepare
    long_prompt = prompt_ids(500, LONG_PROMPT_TOKENS)
    shorts = [prompt_ids(510 + i, n) for i, n in enumerate(SHORT_PROMPTS)]

    # Execute: the long prompt, then the shorts right after it (acknowledged later, so admitted
    # after it). Waiting to see the long prefill first made the test depend on the machine's
    # speed: on a loaded box the ~94 iterations could end before the shorts arrived.
    with sarathi_cluster.client() as client:
        long_id = client.submit(long_prompt, max_new_tokens=OUTPUT_TOKENS).request_id
        short_ids = [client.submit(p, max_new_tokens=OUTPUT_TOKENS).request_id for p in shorts]
        results = {rid: client.result(rid, timeout_s=120) for rid in [long_id, *short_ids]}
    chunks = [
        (rid, instance, details)
        for rid, kind, instance, details in sarathi_cluster.events([long_id, *short_ids])
        if kind == "prefill_chunk_done"
    ]

    # Assert: every iteration within the budget, which it fills (two capped prefills would
    # exceed it, the engine's 4,096 would not stop them), the long capped per iteration and
    # shorts in the long's iterations.
    by_iteration: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for rid, instance, details in chunks:
        assert 0 < details["iteration_tokens"] <= BATCH_TOKENS, details
        by_iteration[instance, details["iteration"]][rid] = details["chunk_tokens"]
    long_chunks = [d["chunk_tokens"] for rid, _, d in chunks if rid == long_id]
    assert max(long_chunks) == LONG_CAP_TOKENS and sum(long_chunks) == LONG_PROMPT_TOKENS
    iteration_tokens = {(i, d["iteration"]): d["iteration_tokens"] for _, i, d in chunks}
    assert max(iteration_tokens.values()) == BATCH_TOKENS
    for key, parts in by_iteration.items():
        assert sum(parts.values()) <= iteration_tokens[key], (key, parts)
    mixed = [parts for parts in by_iteration.values() if long_id in parts and len(parts) > 1]
    assert mixed, f"no short prefill ran in a long chunk's iteration: {dict(by_iteration)}"
    expected = {long_id: long_prompt} | dict(zip(short_ids, shorts, strict=True))
    for rid, prompt in expected.items():
        result = results[rid]
        assert result.state is RequestState.FINISHED, f"{rid}: {result.state} {result.error}"
        assert list(result.token_ids) == reference.greedy(prompt, OUTPUT_TOKENS), rid
