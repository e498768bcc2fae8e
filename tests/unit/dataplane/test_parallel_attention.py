"""Ulysses and ring attention over real gloo groups vs single-process attention on random tensors.

Tolerances: float32 end to end; SP changes only summation order (and the LSE merge), so
rtol = atol = 1e-5 on outputs of magnitude ~1.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_utils import WorkerPool, shared_pool

from dataplane.parallel.attention import (
    _flash_cpu_block,
    _math_block,
    attention_with_lse,
    sdpa_attention,
)
from dataplane.parallel.groups import Group
from dataplane.parallel.ring import ring_attention, ring_decode_attention
from dataplane.parallel.topology import head_shards, offsets
from dataplane.parallel.ulysses import GrowingKV, ulysses_attention, ulysses_decode_attention

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def pool() -> WorkerPool:
    return shared_pool(4)


def _tensors(seed: int, total: int, h: int, g: int, d: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, h, d, generator=gen)
    k = torch.randn(total, g, d, generator=gen)
    v = torch.randn(total, g, d, generator=gen)
    return q, k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(q.shape[0])
    return sdpa_attention(q, k, v, pos, pos)


def _ulysses_job(group: Group, _: Any, seed: int, dims: tuple[int, ...], chunks: list[Any]) -> Any:
    q, k, v = _tensors(seed, *dims)
    heads = head_shards(dims[1], dims[2], group.size)
    kv = GrowingKV()
    outs, start = [], 0
    for lens in chunks:
        lo = start + offsets(lens)[group.rank]
        hi = lo + lens[group.rank]
        outs.append(ulysses_attention(q[lo:hi], k[lo:hi], v[lo:hi], group, lens, heads, kv))
        start += sum(lens)
    # Decode one more token (position `start`) over the head-sharded cache.
    dq, dk, dv = (x[start : start + 1] for x in (q, k, v))
    return outs, ulysses_decode_attention(dq, dk, dv, group, heads, kv)


def _ring_job(group: Group, _: Any, seed: int, dims: tuple[int, ...], chunks: list[Any]) -> Any:
    q, k, v = _tensors(seed, *dims)
    local_k, local_v, local_pos = k[:0], v[:0], torch.zeros(0, dtype=torch.long)
    outs, start = [], 0
    for lens in chunks:
        starts = tuple(start + o for o in offsets(lens))
        lo, hi = starts[group.rank], starts[group.rank] + lens[group.rank]
        local_k, local_v = torch.cat([local_k, k[lo:hi]]), torch.cat([local_v, v[lo:hi]])
        local_pos = torch.cat([local_pos, torch.arange(lo, hi)])
        outs.append(ring_attention(q[lo:hi], local_k, local_v, local_pos, group, lens, starts))
        start += sum(lens)
    # Decode one token at position `start`; rank 0 stores its KV.
    if group.rank == 0:
        local_k, local_v = (
            torch.cat([local_k, k[start : start + 1]]),
            torch.cat([local_v, v[start : start + 1]]),
        )
        local_pos = torch.cat([local_pos, torch.tensor([start])])
    pos = torch.tensor([start])
    dec = ring_decode_attention(q[start : start + 1], pos, local_k, local_v, local_pos, group)
    return outs, dec


def _assemble(results: list[Any], chunks: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[Any]]:
    for res in results:
        if isinstance(res, Exception):
            raise res
    pieces = [results[r][0][c] for c in range(len(chunks)) for r in range(len(results))]
    return torch.cat(pieces), [res[1] for res in results]


CASES = [
    # (size, (h, g, d), chunk splits): uneven lengths, a zero-length shard, GQA with g < size.
    (2, (4, 2, 8), [(37, 21), (5, 30)]),
    (3, (6, 2, 8), [(40, 0, 17), (9, 9, 10)]),
    (4, (8, 2, 4), [(11, 13, 17, 19), (1, 2, 3, 4)]),
    (3, (4, 4, 8), [(20, 31, 7)]),  # heads not divisible by size (2, 1, 1 heads)
    (4, (8, 1, 4), [(16, 16, 16, 15)]),  # MQA: one KV head replicated on every member
]


@pytest.mark.parametrize(("size", "heads", "chunks"), CASES)
def test_ulysses_chunked_prefill_and_decode_match_single_process(
    pool: WorkerPool, size: int, heads: tuple[int, int, int], chunks: list[tuple[int, ...]]
) -> None:
    # Prepare
    total = sum(sum(c) for c in chunks)
    dims = (total + 1, *heads)
    q, k, v = _tensors(7, *dims)
    expected = _reference(q, k, v)

    # Execute
    results = pool.run(_ulysses_job, list(range(size)), 7, dims, chunks)

    # Assert
    out, decs = _assemble(results, chunks)
    torch.testing.assert_close(out, expected[:total], **TOL)
    for dec in decs:
        torch.testing.assert_close(dec, expected[total:], **TOL)


@pytest.mark.parametrize(("size", "heads", "chunks"), CASES[:3])
def test_ring_chunked_prefill_and_decode_match_single_process(
    pool: WorkerPool, size: int, heads: tuple[int, int, int], chunks: list[tuple[int, ...]]
) -> None:
    # Prepare
    total = sum(sum(c) for c in chunks)
    dims = (total + 1, *heads)
    q, k, v = _tensors(11, *dims)
    expected = _reference(q, k, v)

    # Execute
    results = pool.run(_ring_job, list(range(size)), 11, dims, chunks)

    # Assert
    out, decs = _assemble(results, chunks)
    torch.testing.assert_close(out, expected[:total], **TOL)
    for dec in decs:
        torch.testing.assert_close(dec, expected[total:], **TOL)


def test_attention_with_lse_matches_sdpa_and_reports_empty_rows() -> None:
    # Prepare
    q, k, v = _tensors(3, 50, 4, 2, 8)
    q_pos = torch.arange(10, 60)
    k_pos = torch.arange(20, 70)  # the first 10 queries see no key

    # Execute
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos)

    # Assert
    torch.testing.assert_close(out[10:], sdpa_attention(q[10:], k, v, q_pos[10:], k_pos), **TOL)
    assert torch.all(out[:10] == 0)
    assert torch.all(torch.isneginf(lse[:10])) and torch.all(torch.isfinite(lse[10:]))


def test_portable_math_kernel_matches_the_fused_cpu_kernel() -> None:
    # Prepare: the non-CPU path (explicit softmax) on the same block as the CPU flash path.
    q, k, v = _tensors(5, 40, 4, 2, 8)
    visible = torch.arange(40)[None, :] <= torch.arange(40)[:, None]
    qh = q.transpose(0, 1)
    kh, vh = (x.transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))

    # Execute
    math_out, math_lse = _math_block(qh, kh, vh, visible)
    flash_out, flash_lse = _flash_cpu_block(qh, kh, vh, visible)

    # Assert
    torch.testing.assert_close(math_out, flash_out, **TOL)
    torch.testing.assert_close(math_lse, flash_lse, **TOL)
