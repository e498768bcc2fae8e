"""KV compaction on CUDA: overlapping device copies, and decodes through CUDA graphs after moves.

Skipped without a GPU. The reference is the same schedule in a pool large enough that nothing
moves: every iteration then batches the same tokens, so the outputs must be identical.
"""

from __future__ import annotations

import pytest
import torch

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.kv_cache import KVCache
from dataplane.engine.types import Finished, SamplingParams
from dataplane.models.llama import LlamaForCausalLM
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("shift", [1, 7, 255, 256, 300, 5000])
def test_overlapping_moves_on_the_device_copy_exactly(shift: int) -> None:
    # Prepare: one 4,000-row range `shift` rows above the bottom of the pool.
    kv = KVCache(
        num_layers=4,
        num_kv_heads=8,
        head_dim=128,
        pool_tokens=10_000,
        dtype=torch.bfloat16,
        device=CUDA,
    )
    hole = kv.reserve_movable("hole", shift)
    rng = kv.reserve_movable("r", 4000)
    want = torch.randn(kv.pool[:, :, :4000].shape, device=CUDA).to(torch.bfloat16)
    kv.pool[:, :, shift : shift + 4000].copy_(want)
    kv.release(hole.start)

    # Execute
    moved = kv.compact()
    torch.cuda.synchronize()

    # Assert
    assert moved == 4000 and rng.start == 0
    assert torch.equal(kv.pool[:, :, :4000], want)


def _scenario(model: LlamaForCausalLM, kv_tokens: int) -> tuple[dict[str, list[int]], Engine]:
    """Fragment, then admit `e` (70 rows); c is moved paused mid-prefill, d mid-decode when the
    pool is too small to place e without compaction; later decode-only steps replay graphs."""
    budget = kv_tokens * model.shape.kv_bytes_per_token(torch.bfloat16)
    engine = Engine(
        model, EngineConfig(kv_budget_bytes=budget, chunk_tokens=8, max_batch_tokens=64)
    )
    # b [0,50) c [50,90) a [90,120) d [120,170) (one row higher with the graphs' scratch row)
    sizes = {"b": (44, 7), "c": (34, 7), "a": (24, 7), "d": (27, 24), "e": (62, 9)}
    gen = torch.Generator().manual_seed(5)
    prompts = {
        rid: torch.randint(0, 256, (n,), generator=gen).tolist() for rid, (n, _) in sizes.items()
    }
    for rid in "bcad":
        engine.add_request(rid, prompts[rid], SamplingParams(max_new_tokens=sizes[rid][1]))
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for event in engine.step():
            if isinstance(event, Finished):
                outputs[event.request_id] = list(event.output_token_ids)

    step()
    engine.pause("c")
    engine.cancel("b")
    while "a" not in outputs:  # then free: b's 50 rows, a's 30 and 20 (or 21) at the top
        step()
    engine.add_request("e", prompts["e"], SamplingParams(max_new_tokens=9))
    engine.resume("c")
    while engine.has_runnable_work():
        step()
    return outputs, engine


def test_requests_moved_mid_decode_and_mid_prefill_decode_identically_with_cuda_graphs() -> None:
    # Prepare
    model = random_model(preset_config("tiny"), seed=7, dtype=torch.bfloat16, device=CUDA)

    # Execute
    want, reference = _scenario(model, kv_tokens=400)
    got, compacted = _scenario(model, kv_tokens=1 + 30 + 40 + 50 + 70)

    # Assert
    assert reference.kv.num_compactions == 0 and compacted.kv.num_compactions == 1
    assert compacted.kv.num_moved_tokens == 40 + 50  # c and d slid down
    assert compacted.graphs is not None or compacted.graph_error is not None
    assert got == want and set(got) == set("acde")
