"""The swappable attention step of the decoder, and the KV-cached implementation the engine uses.

Contract (what `LlamaForCausalLM.forward` calls once per layer)::

    attend(layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor
        q: (T, Hq, D)   queries of the T new tokens, RoPE already applied at their positions
        k: (T, Hkv, D)  keys of the new tokens, RoPE applied
        v: (T, Hkv, D)  values of the new tokens
        returns (T, Hq, D) attention output in q's dtype, same token order

The T tokens are a flat concatenation of one or more sequences' new tokens; how they map to
sequences and to cached context is the business of the `attend` object (the model never
sees a cache). Head counts are read from the tensors, not the config, so a sequence-parallel
wrapper may call an inner `attend` with a head shard (Hq/P, Hkv/P). Implementations:

* `dense_causal_attend`: one sequence, no cache, plain causal attention over the T tokens
  (reference forward, SP tests).
* `CachedAttention(k_pools, v_pools, batch)`: writes k, v into per-layer pools at
  `batch.slot_mapping`, then attends each sequence over its cached rows
  `[kv_start, kv_start + num_kv_tokens)` with a causal mask aligned bottom-right (a chunk of
  n new tokens after c cached ones sees keys 0..c+i for its i-th token).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dataplane.models.fused import store_kv


class Attend(Protocol):
    """The attention step of one forward pass; see the module docstring for shapes."""

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention output (T, Hq, D) for new tokens q (T, Hq, D), k/v (T, Hkv, D)."""
        ...


def dense_causal_attend(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Causal self-attention over exactly the T given tokens of one sequence (no cache)."""
    del layer_idx
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (T, Hq, D) -> (1, Hq, T, D)
        k.transpose(0, 1)[None],  # (T, Hkv, D) -> (1, Hkv, T, D)
        v.transpose(0, 1)[None],
        is_causal=True,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)  # (1, Hq, T, D) -> (T, Hq, D)


@dataclass(frozen=True, slots=True)
class AttentionBatch:
    """Where each sequence's new tokens sit in the flat token dim and in the KV pools.

    Sequences with exactly one new token (decodes) come first, then prefill chunks; the
    builder `make_attention_batch` enforces that order.
    """

    num_new_tokens: tuple[int, ...]  # per sequence: new tokens in this forward (query length)
    num_kv_tokens: tuple[int, ...]  # per sequence: cached + new tokens after the write
    kv_starts: tuple[int, ...]  # per sequence: pool row of its token 0
    num_decodes: int  # leading sequences with one new token, attended as one group
    slot_mapping: torch.Tensor  # (T,) int64: pool row where each new token's k/v is written
    decode_kv_starts: torch.Tensor  # (num_decodes,) int32 on the device
    decode_kv_lens: torch.Tensor  # (num_decodes,) int32 on the device
    prefill_cu_q: torch.Tensor  # (num_prefills + 1,) int32: chunk offsets in the prefill rows
    prefill_kv_starts: torch.Tensor  # (num_prefills,) int32 on the device
    prefill_kv_lens: torch.Tensor  # (num_prefills,) int32 on the device


def make_attention_batch(
    num_new_tokens: Sequence[int],
    num_kv_tokens: Sequence[int],
    kv_starts: Sequence[int],
    device: torch.device,
) -> AttentionBatch:
    """Build the batch description (and its few device tensors) for one forward pass."""
    num_decodes = 0
    while num_decodes < len(num_new_tokens) and num_new_tokens[num_decodes] == 1:
        num_decodes += 1
    for i in range(len(num_new_tokens)):
        if num_new_tokens[i] < 1 or num_kv_tokens[i] < num_new_tokens[i]:
            raise ValueError(f"sequence {i}: num_new_tokens/num_kv_tokens out of range")
    # Decodes write one row each at start + total - 1; prefill chunks write a contiguous run.
    decode_slots = [kv_starts[i] + num_kv_tokens[i] - 1 for i in range(num_decodes)]
    slots = [torch.tensor(decode_slots, dtype=torch.int64)]
    for i in range(num_decodes, len(num_new_tokens)):
        first = kv_starts[i] + num_kv_tokens[i] - num_new_tokens[i]
        slots.append(torch.arange(first, first + num_new_tokens[i], dtype=torch.int64))
    cu_q = [0]
    for n in num_new_tokens[num_decodes:]:
        cu_q.append(cu_q[-1] + n)
    meta = torch.tensor([*kv_starts, *num_kv_tokens, *cu_q], dtype=torch.int32).to(
        device, non_blocking=True
    )  # one host-to-device copy, split into views below
    num_seqs = len(kv_starts)
    starts, lens, cu = meta[:num_seqs], meta[num_seqs : 2 * num_seqs], meta[2 * num_seqs :]
    return AttentionBatch(
        num_new_tokens=tuple(num_new_tokens),
        num_kv_tokens=tuple(num_kv_tokens),
        kv_starts=tuple(kv_starts),
        num_decodes=num_decodes,
        slot_mapping=torch.cat(slots).to(device, non_blocking=True),
        decode_kv_starts=starts[:num_decodes],
        decode_kv_lens=lens[:num_decodes],
        prefill_cu_q=cu,
        prefill_kv_starts=starts[num_decodes:],
        prefill_kv_lens=lens[num_decodes:],
    )


class CachedAttention:
    """`Attend` over per-layer KV pools: write the new k/v, then attend each sequence's rows.

    Pools are (pool_tokens, Hkv, D) per layer. Kernels are chosen by the caller (the engine
    probes once what the device supports: `flash_varlen_works`, `split_kv_decode_works`):

    * split-KV decode (CUDA with Triton, `split_kv_decode=True`): all decodes in one Triton
      launch that splits each sequence's keys across thread blocks and merges the partial
      softmax results (`dataplane.models.decode_attention`); prefill chunks use one of the
      families below.

    * flash varlen (CUDA): one `_flash_attention_forward` call for all decodes, with the GQA
      group folded into the query length so each KV row is read once per KV head, and one call
      for all prefill chunks (bottom-right causal). Rows are read in place: no gather.
    * portable SDPA (CPU, or CUDA without it): one SDPA call per prefill chunk over a view of
      its rows, and one SDPA call for all decodes over rows gathered to a padded batch.
    """

    def __init__(
        self,
        k_pools: Sequence[torch.Tensor],
        v_pools: Sequence[torch.Tensor],
        batch: AttentionBatch,
        *,
        use_flash_varlen: bool,
        split_kv_decode: bool = False,
    ) -> None:
        self._k_pools = k_pools
        self._v_pools = v_pools
        self._batch = batch
        self._use_flash_varlen = use_flash_varlen
        self._split_kv_decode = split_kv_decode
        self._decode_gather: tuple[torch.Tensor, torch.Tensor] | None = None
        self._flash_cu: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per forward

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write k/v into the layer's pools, return attention output (T, Hq, D)."""
        batch = self._batch
        k_pool, v_pool = self._k_pools[layer_idx], self._v_pools[layer_idx]
        store_kv(k_pool, v_pool, k, v, batch.slot_mapping)
        out = torch.empty_like(q)
        nd = batch.num_decodes
        if nd > 0:
            if self._split_kv_decode:
                self._split_kv(q[:nd], k_pool, v_pool, out[:nd])
            elif self._use_flash_varlen:
                out[:nd] = self._flash_decode(q[:nd], k_pool, v_pool)
            else:
                out[:nd] = self._sdpa_decode(q[:nd], k_pool, v_pool)
        if nd < len(batch.num_new_tokens):
            if self._use_flash_varlen:
                out[nd:] = self._flash_prefill(q[nd:], k_pool, v_pool)
            else:
                _sdpa_prefill(q, k_pool, v_pool, batch, out)
        return out

    def _split_kv(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor
    ) -> None:
        """All decodes by the Triton split-KV kernel, written into `out` (num_decodes, Hq, D)."""
        from dataplane.models.decode_attention import choose_num_splits, split_kv_decode

        batch = self._batch
        num_splits = choose_num_splits(
            batch.num_decodes,
            k_pool.shape[1],
            _num_sms(q.device),
            max(batch.num_kv_tokens[: batch.num_decodes]),  # an upper bound under CUDA graphs
        )
        split_kv_decode(
            q, k_pool, v_pool, batch.decode_kv_starts, batch.decode_kv_lens, out, num_splits
        )

    def _flash_decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor
    ) -> torch.Tensor:
        """All decodes: the GQA group folded into the query length (G rows see the same keys),
        so every KV row is read once per KV head."""
        batch = self._batch
        num_seqs, num_q_heads, head_dim = q.shape
        num_kv_heads = k_pool.shape[1]
        group = num_q_heads // num_kv_heads
        if "decode" not in self._flash_cu:  # built by the first layer, reused by the rest
            cu_q = torch.arange(
                0, (num_seqs + 1) * group, group, device=q.device, dtype=torch.int32
            )
            self._flash_cu["decode"] = (cu_q, _cu_k(batch.decode_kv_starts))
        cu_q, cu_k = self._flash_cu["decode"]
        queries = q.view(num_seqs, num_kv_heads, group, head_dim).transpose(1, 2)
        queries = queries.reshape(num_seqs * group, num_kv_heads, head_dim)  # -> (B*G, Hkv, D)
        out = _flash_call(
            queries,
            k_pool,
            v_pool,
            cu_q,
            cu_k,
            batch.decode_kv_lens,
            group,
            max(batch.num_kv_tokens[:num_seqs]),
            causal=False,
        )
        out = out.view(num_seqs, group, num_kv_heads, head_dim).transpose(1, 2)
        return out.reshape(num_seqs, num_q_heads, head_dim)  # (B, Hkv, G, D) -> (B, Hq, D)

    def _flash_prefill(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor
    ) -> torch.Tensor:
        """All prefill chunks in one varlen call with bottom-right causal masking."""
        batch = self._batch
        nd = batch.num_decodes
        if "prefill" not in self._flash_cu:
            self._flash_cu["prefill"] = (batch.prefill_cu_q, _cu_k(batch.prefill_kv_starts))
        cu_q, cu_k = self._flash_cu["prefill"]
        return _flash_call(
            q,
            k_pool,
            v_pool,
            cu_q,
            cu_k,
            batch.prefill_kv_lens,
            max(batch.num_new_tokens[nd:]),
            max(batch.num_kv_tokens[nd:]),
            causal=True,
        )

    def _sdpa_decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor
    ) -> torch.Tensor:
        """All decodes in one SDPA call over rows gathered into a padded (B, L) batch."""
        batch = self._batch
        if self._decode_gather is None:
            # Built once per forward, shared by every layer.
            max_len = max(batch.num_kv_tokens[: batch.num_decodes])
            offsets = torch.arange(max_len, device=q.device, dtype=torch.int32)[None, :]
            lens = batch.decode_kv_lens[:, None]
            rows = batch.decode_kv_starts[:, None] + torch.minimum(offsets, lens - 1)
            mask = (offsets < lens)[:, None, None, :]  # (B, 1, 1, L)
            self._decode_gather = (rows.long(), mask)
        rows, mask = self._decode_gather
        num_seqs, num_q_heads, head_dim = q.shape
        num_kv_heads = k_pool.shape[1]
        group = num_q_heads // num_kv_heads
        keys = k_pool[rows].transpose(1, 2)  # (B, L, Hkv, D) -> (B, Hkv, L, D)
        values = v_pool[rows].transpose(1, 2)
        queries = q.view(num_seqs, num_kv_heads, group, head_dim)  # GQA group as query length
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        return out.reshape(num_seqs, num_q_heads, head_dim)  # (B, Hkv, G, D) -> (B, Hq, D)


def _sdpa_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch: AttentionBatch,
    out: torch.Tensor,
) -> None:
    """One SDPA call per prefill chunk over a view of its cached rows; writes into `out`."""
    offset = sum(batch.num_new_tokens[: batch.num_decodes])
    gqa = q.shape[1] != k_pool.shape[1]
    for i in range(batch.num_decodes, len(batch.num_new_tokens)):
        n, total, start = batch.num_new_tokens[i], batch.num_kv_tokens[i], batch.kv_starts[i]
        queries = q[offset : offset + n].transpose(0, 1)[None]  # (n, Hq, D) -> (1, Hq, n, D)
        keys = k_pool[start : start + total].transpose(0, 1)[None]  # -> (1, Hkv, total, D)
        values = v_pool[start : start + total].transpose(0, 1)[None]
        if n == total:
            res = F.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, enable_gqa=gqa
            )
        else:
            # Bottom-right causal: new token j (at position total-n+j) sees keys 0..total-n+j.
            q_pos = torch.arange(total - n, total, device=q.device)[:, None]
            mask = torch.arange(total, device=q.device)[None, :] <= q_pos  # (n, total)
            res = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, enable_gqa=gqa
            )
        out[offset : offset + n] = res[0].transpose(0, 1)  # (1, Hq, n, D) -> (n, Hq, D)
        offset += n


def _flash_call(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    kv_lens: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
) -> torch.Tensor:
    """Flash-attention varlen over pools: sequence b reads rows cu_k[b] + [0, kv_lens[b])."""
    result = torch.ops.aten._flash_attention_forward(
        q,
        k_pool,
        v_pool,
        cu_q,
        cu_k,
        max_q,
        max_k,
        0.0,
        causal,
        False,
        scale=1.0 / math.sqrt(q.shape[-1]),
        seqused_k=kv_lens,
    )
    out: torch.Tensor = result[0]
    return out


def _cu_k(kv_starts: torch.Tensor) -> torch.Tensor:
    """cu_seqlens_k for `seqused_k` mode: only entry b (the start) is read, so the starts need
    not be sorted; the last entry is a placeholder."""
    return torch.cat((kv_starts, kv_starts[-1:]))


def _num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the split-KV kernel sizes its grid from it)."""
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def flash_varlen_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once whether the flash varlen path runs here and matches the portable path."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _matches_portable(device, dtype, {"use_flash_varlen": True})


def split_kv_decode_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once whether the Triton split-KV decode kernel runs here and matches SDPA.

    False on CPU and wherever Triton is not installed: Triton is imported only here and in
    `CachedAttention` when this probe said yes.
    """
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return _matches_portable(device, dtype, {"use_flash_varlen": False, "split_kv_decode": True})


def _matches_portable(device: torch.device, dtype: torch.dtype, kernels: dict[str, bool]) -> bool:
    """Whether `CachedAttention` with `kernels` runs a small mixed batch and matches SDPA."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool_tokens, heads_q, heads_kv, head_dim = 64, 8, 2, 64
    k_pool = torch.randn(pool_tokens, heads_kv, head_dim, generator=gen).to(device, dtype)
    v_pool = torch.randn(pool_tokens, heads_kv, head_dim, generator=gen).to(device, dtype)
    # Two decodes stored out of order, one prefill chunk after 5 cached tokens.
    batch = make_attention_batch((1, 1, 4), (7, 3, 9), (40, 10, 20), device)
    q = torch.randn(6, heads_q, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(6, heads_kv, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(6, heads_kv, head_dim, generator=gen).to(device, dtype)
    try:
        fast = CachedAttention([k_pool.clone()], [v_pool.clone()], batch, **kernels)
        got = fast(0, q, k, v)
    except Exception:  # noqa: BLE001 - a kernel that fails to build or launch is "not here"
        return False
    slow = CachedAttention([k_pool], [v_pool], batch, use_flash_varlen=False)
    want = slow(0, q, k, v)
    return bool(torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2))
