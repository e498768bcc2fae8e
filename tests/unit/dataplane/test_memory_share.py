"""Several workers on one GPU: each worker's memory share and the per-GPU fit check (CPU)."""

from __future__ import annotations

import pytest
import torch

from dataplane.models.llama import ModelShape
from dataplane.models.presets import preset_config
from dataplane.worker.memory import CUDA_CONTEXT_BYTES, GIB, check_gpu_shares
from dataplane.worker.process import WorkerSpec, worker_memory

H200_BYTES = 143_771 * (1 << 20)  # nvidia-smi's total for one H200


def _spec(kv_budget_bytes: int) -> WorkerSpec:
    return WorkerSpec(
        member_id="n/0",
        model="llama-3.2-1b",
        seed=0,
        device="cuda:0",
        dtype="bfloat16",
        kv_budget_tokens=None,
        kv_budget_bytes=kv_budget_bytes,
        max_batch_tokens=2048,
        store_address="127.0.0.1:1",
        group_timeout_s=30.0,
        num_threads=1,
    )


def test_a_workers_share_is_weights_kv_activations_and_context() -> None:
    # Prepare
    shape = ModelShape.from_config(preset_config("llama-3.2-1b"))
    per_token = shape.kv_bytes_per_token(torch.bfloat16)

    # Execute
    share = worker_memory(_spec(8 * GIB + 5))

    # Assert: bf16 weights, the KV budget in whole tokens, a positive activation reserve
    assert share.weights_bytes == 2 * shape.num_params()
    assert share.kv_bytes == (8 * GIB + 5) // per_token * per_token
    assert 0 < share.activation_bytes < 4 * GIB
    assert share.total_bytes == (
        share.weights_bytes + share.kv_bytes + share.activation_bytes + CUDA_CONTEXT_BYTES
    )


def test_four_workers_share_one_h200_and_too_many_are_refused_with_the_numbers() -> None:
    # Prepare
    share = worker_memory(_spec(24 * GIB))

    # Execute / Assert: 4 x ~28 GiB fit 92% of an H200; 5 do not, on GPU 0 only
    check_gpu_shares([0, 0, 0, 0], share, {0: H200_BYTES}, 0.92)
    with pytest.raises(ValueError, match=r"5 workers do not fit GPU 0: each needs .* GiB in all"):
        check_gpu_shares([0, 0, 0, 0, 0, 1], share, {0: H200_BYTES, 1: H200_BYTES}, 0.92)
    check_gpu_shares([0, 0, 1, 1, 1], share, {0: H200_BYTES, 1: H200_BYTES}, 0.92)
