"""The Triton kernels on CUDA: split-KV decode attention against a float32 torch reference,
and the fused RoPE, residual-add + RMSNorm and KV-store kernels against the torch ops.

Skipped without a GPU or Triton. Shapes: batch 1-64, contexts 1-32K with uneven lengths and
lengths on both sides of key-block (64) and split boundaries, GQA ratios 1/4/8, head_dim 64 and
128, one split up to the most. Sequences sit out of order in the pool with gaps between them,
and the output is a row-strided slice, as in the engine. Tolerances: bf16 inputs are exact in
float32, the kernel rounds the softmax weights to bf16 before the PV product (as flash
attention does) and the output once: 1e-2 absolute, 2e-2 relative on outputs of magnitude <= 1;
float32 runs with IEEE dot products: 1e-4.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA device and Triton",
    ),
]
CUDA = torch.device("cuda")
TOL = {torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2}, torch.float32: {"atol": 1e-4, "rtol": 1e-4}}
BOUNDARY_LENS = [1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 4097]


def _reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, starts: list[int], lens: list[int]
) -> torch.Tensor:
    """Per-sequence SDPA in float32 over the pool rows (GQA expanded by SDPA)."""
    outs = []
    for b, (start, n) in enumerate(zip(starts, lens, strict=True)):
        keys = k_pool[start : start + n].float().transpose(0, 1)[None]  # (1, Hkv, n, D)
        values = v_pool[start : start + n].float().transpose(0, 1)[None]
        query = q[b].float()[None, :, None]  # (1, Hq, 1, D)
        outs.append(F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)[0, :, 0])
    return torch.stack(outs)  # (B, Hq, D)


def _run(
    lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    num_splits: int | None, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    from dataplane.models.decode_attention import choose_num_splits, split_kv_decode

    gen = torch.Generator(device=CUDA).manual_seed(seed)
    order = torch.randperm(len(lens), generator=gen, device=CUDA).tolist()
    starts, row = [0] * len(lens), 0
    for b in order:  # out of order, with a 3-row gap after each sequence
        starts[b], row = row, row + lens[b] + 3
    shape = (row, num_kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen, device=CUDA).to(dtype)
    v_pool = torch.randn(shape, generator=gen, device=CUDA).to(dtype)
    q = torch.randn(len(lens), num_q_heads, head_dim, generator=gen, device=CUDA).to(dtype)
    out = torch.full((len(lens) + 2, num_q_heads, head_dim), float("nan"), device=CUDA, dtype=dtype)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
        num_splits = choose_num_splits(len(lens), num_kv_heads, sms, max(lens))
    split_kv_decode(
        q,
        k_pool,
        v_pool,
        torch.tensor(starts, dtype=torch.int32, device=CUDA),
        torch.tensor(lens, dtype=torch.int32, device=CUDA),
        out[1:-1],
        num_splits,
    )
    assert out[0].isnan().all() and out[-1].isnan().all(), "wrote outside its rows"
    return out[1:-1], _reference(q, k_pool, v_pool, starts, lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("num_splits", [1, 3, None, 64])
def test_boundary_lengths_match_the_reference(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, num_splits: int | None
) -> None:
    # Execute
    got, want = _run(BOUNDARY_LENS, num_q_heads, num_kv_heads, 128, dtype, num_splits, seed=1)

    # Assert
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize(
    ("batch", "max_len", "num_q_heads", "num_kv_heads", "head_dim"),
    [
        (1, 32768, 32, 8, 128),
        (1, 8192, 32, 32, 128),
        (16, 8192, 32, 8, 128),
        (64, 1024, 32, 8, 128),
        (64, 32768, 32, 4, 128),
        (7, 5000, 16, 2, 64),
    ],
)
def test_uneven_batches_match_the_reference(
    batch: int, max_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    # Prepare: uneven lengths in [1, max_len], the longest exactly max_len.
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lens[0] = max_len

    # Execute
    got, want = _run(lens, num_q_heads, num_kv_heads, head_dim, torch.bfloat16, None, seed=2)

    # Assert
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


def test_one_launch_shape_serves_other_lengths_as_in_a_cuda_graph() -> None:
    # Prepare: capture the kernel with splits sized for 32K, replay with short and long lengths.
    from dataplane.models.decode_attention import split_kv_decode

    gen = torch.Generator(device=CUDA).manual_seed(3)
    k_pool = torch.randn(40_000, 8, 128, generator=gen, device=CUDA).bfloat16()
    v_pool = torch.randn(40_000, 8, 128, generator=gen, device=CUDA).bfloat16()
    q = torch.randn(2, 32, 128, generator=gen, device=CUDA).bfloat16()
    starts = torch.tensor([0, 33_000], dtype=torch.int32, device=CUDA)
    lens = torch.tensor([1, 1], dtype=torch.int32, device=CUDA)
    out = torch.empty_like(q)
    split_kv_decode(q, k_pool, v_pool, starts, lens, out, 33)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        split_kv_decode(q, k_pool, v_pool, starts, lens, out, 33)
    results = {}

    # Execute
    for case in ([5, 70], [32_000, 6_000], [1, 1]):
        lens.copy_(torch.tensor(case, dtype=torch.int32))
        graph.replay()
        results[tuple(case)] = out.clone()

    # Assert
    for case, got in results.items():
        want = _reference(q, k_pool, v_pool, [0, 33_000], list(case))
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


def test_rope_kernel_equals_the_torch_formula_in_float32() -> None:
    # Prepare: q and k as views of one fused projection output, as the model has them.
    from dataplane.models.rope import apply_rope, rope_cos_sin
    from dataplane.models.triton_ops import rope_qk_

    gen = torch.Generator(device=CUDA).manual_seed(4)
    qkv = torch.randn(9, (32 + 16) * 128, generator=gen, device=CUDA)
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    q, k = q.view(9, 32, 128), k.view(9, 8, 128)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=CUDA).float() / 128))
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 5, 63, 64, 1000, 8191, 32767, 3], device=CUDA),
                            inv_freq, torch.float32)  # fmt: skip
    want_q, want_k, want_v = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.clone()

    # Execute
    rope_qk_(q, k, cos, sin)

    # Assert
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, want_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_kernel_equals_the_unfused_ops(dtype: torch.dtype) -> None:
    # Prepare
    from dataplane.models.llama import RMSNorm
    from dataplane.models.triton_ops import add_rms_norm

    gen = torch.Generator(device=CUDA).manual_seed(5)
    norm = RMSNorm(4096, 1e-5).to(CUDA, dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1, generator=gen)
    x = torch.randn(7, 4096, generator=gen, device=CUDA).to(dtype)
    residual = torch.randn(7, 4096, generator=gen, device=CUDA).to(dtype)

    # Execute
    normed, summed = add_rms_norm(x, residual, norm.weight, norm.eps)

    # Assert: the sum is rounded exactly as torch's add; the norm to one rounding of dtype.
    assert torch.equal(summed, x + residual)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(normed, norm(x + residual), **tol)


def test_store_kv_kernel_writes_exactly_the_slots() -> None:
    # Prepare: k, v as row-strided views of one projection output, slots out of order.
    from dataplane.models.triton_ops import store_kv_

    gen = torch.Generator(device=CUDA).manual_seed(6)
    k_pool = torch.zeros(100, 8, 128, device=CUDA, dtype=torch.bfloat16)
    v_pool = torch.zeros_like(k_pool)
    kv = torch.randn(5, 2 * 8 * 128, generator=gen, device=CUDA).bfloat16()
    k, v = (t.view(5, 8, 128) for t in kv.split(8 * 128, dim=-1))
    slots = torch.tensor([99, 0, 50, 51, 7], device=CUDA)

    # Execute
    store_kv_(k_pool, v_pool, k, v, slots)

    # Assert
    want_k = torch.zeros_like(k_pool).index_copy_(0, slots, k)
    want_v = torch.zeros_like(v_pool).index_copy_(0, slots, v)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)
