"""SP attention and SP prefill on CUDA (bf16, flash kernel) against float32 and one-GPU references.

Kernel checks run on one GPU; the SP prefill over NCCL needs two. Tolerances are bf16's: the
flash path and the float32 math path differ by bf16 rounding of q/k/v and of the output.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_utils import WorkerPool

from dataplane.models.attention import dense_causal_attend
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config
from dataplane.parallel.attention import attention_with_lse, causal_suffix_attention
from dataplane.parallel.groups import Group
from dataplane.parallel.sp_runner import SpRequest
from dataplane.parallel.topology import SpKind

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
SEED = 11


def _qkv(n: int, m: int, h: int = 32, g: int = 8, d: int = 128) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n * 7919 + m)
    q = torch.randn(n, h, d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(m, g, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(m, g, d, generator=gen).to("cuda", torch.bfloat16)
    return q, k, v


@pytest.mark.parametrize(
    ("q_range", "k_ranges"),
    [
        ((1000, 1512), [(0, 1512)]),  # history prefix + this block's causal diagonal
        ((100, 612), [(0, 100), (700, 800)]),  # prefix, then keys after every query
        ((0, 512), [(0, 512)]),  # diagonal only
        ((50, 100), [(60, 121)]),  # the first 10 queries see no key at all
        ((3000, 3100), [(0, 2048)]),  # prefix only (a ring hop over an older shard)
        ((0, 64), [(100, 200)]),  # nothing visible
        ((0, 100), [(0, 50), (60, 100)]),  # a gap: not a flash shape, falls back to math
    ],
)
def test_flash_attention_with_lse_matches_float32_math(
    q_range: tuple[int, int], k_ranges: list[tuple[int, int]]
) -> None:
    # Prepare
    q_pos = torch.arange(*q_range, device="cuda")
    k_pos = torch.cat([torch.arange(lo, hi, device="cuda") for lo, hi in k_ranges])
    q, k, v = _qkv(len(q_pos), len(k_pos))

    # Execute
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos)
    ref_out, ref_lse = attention_with_lse(q.float(), k.float(), v.float(), q_pos, k_pos)

    # Assert
    assert out.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref_out, **BF16_TOL)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse[seen], ref_lse[seen], **BF16_TOL)


@pytest.mark.parametrize(("n", "m"), [(512, 512), (256, 4096), (1, 300)])
def test_flash_causal_suffix_matches_float32_math(n: int, m: int) -> None:
    # Prepare
    q, k, v = _qkv(n, m)

    # Execute
    got = causal_suffix_attention(q, k, v)
    want = causal_suffix_attention(q.float(), k.float(), v.float())

    # Assert
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, **BF16_TOL)


def _sp_prefill_job(group: Group, _: Any, prompt: list[int], kind: int) -> Any:
    model = random_model(
        preset_config("tiny"), seed=SEED, dtype=torch.bfloat16, device=group.device
    )
    sp = SpRequest(
        model, group, "long", prompt, max_new_tokens=2, chunk_tokens=1024, kind=SpKind(kind)
    )
    logits = None
    with torch.inference_mode():
        while not sp.is_prefill_done:
            logits = sp.run_next_chunk()
    sp.free()
    return None if logits is None else logits.float().cpu()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("kind", [SpKind.ULYSSES, SpKind.RING])
def test_sp_prefill_over_nccl_matches_one_gpu_forward(kind: SpKind) -> None:
    # Prepare: 3000 tokens = chunks of 1024, 1024, 952 split over two GPUs.
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, 256, (3000,), generator=gen).tolist()
    model = random_model(preset_config("tiny"), seed=SEED, dtype=torch.bfloat16, device="cuda:0")
    ids = torch.tensor(prompt, device="cuda:0")
    with torch.inference_mode():
        want = model(ids, torch.arange(len(prompt), device="cuda:0"), dense_causal_attend)[-1]
    pool = WorkerPool(2, device="cuda")

    # Execute
    try:
        results = pool.run(_sp_prefill_job, [0, 1], prompt, kind.value, timeout_s=300.0)
    finally:
        pool.close()

    # Assert: the last token's owner (rank 1) has the logits; they match the one-GPU forward.
    assert results[0] is None
    got = results[1].reshape(-1)
    torch.testing.assert_close(got, want.float().cpu(), rtol=5e-2, atol=1e-1)
    assert int(got.argmax()) == int(want.argmax())
