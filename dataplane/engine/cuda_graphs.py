"""CUDA graphs for decode-only iterations (split-KV or flash varlen decode kernel).

A decode step of an 8B model launches ~1,500 small kernels; launched one by one from Python
that costs more host time than the GPU needs to stream the weights. `DecodeGraphs` captures the
whole forward once per padded batch size (1, 2, 4, 8, 16, 24, 32, 48, 64, ...) over static
input buffers and replays it:

* inputs live in static device buffers: token ids, positions, KV slots (int64) and per-sequence
  KV starts / lengths (int32); a replay copies the real values in, padding rows point at a
  one-row scratch range of the pool that belongs to no request;
* the decode kernel inside the graph receives an upper bound (`max_kv_tokens`) for the
  longest sequence (flash: max_seqlen_k; split-KV: the number of splits) and reads each
  sequence's true length on the device, so the bound only sizes the launch;
* logits come out of a static (padded_batch, vocab) buffer; sampling runs eagerly after.

Steps that contain a prefill chunk, or more sequences than the largest graph, run eagerly.
"""

from __future__ import annotations

import torch

from dataplane.engine.kv_cache import KVCache
from dataplane.models.attention import AttentionBatch, CachedAttention, make_attention_batch
from dataplane.models.llama import LlamaForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """Captured decode forwards, one per padded batch size up to `max_batch_seqs`."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        k_pools: list[torch.Tensor],
        v_pools: list[torch.Tensor],
        *,
        max_batch_seqs: int,
        max_kv_tokens: int,
        scratch_row: int,
        kernels: dict[str, bool],
    ) -> None:
        """`kernels`: the `CachedAttention` kernel flags of the engine (see its attention_kernels)."""
        device = next(model.parameters()).device
        self.buckets = [b for b in BATCH_BUCKETS if b <= max_batch_seqs]
        size = self.buckets[-1]
        self._scratch_row = scratch_row
        self._ids = torch.zeros(3, size, dtype=torch.int64, device=device)  # ids, pos, slots
        self._kv = torch.zeros(2, size, dtype=torch.int32, device=device)  # starts, lens
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        self._reset_inputs()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):  # largest first so smaller ones reuse memory
                batch = self._static_batch(bucket, max_kv_tokens)

                def forward(batch: AttentionBatch = batch, bucket: int = bucket) -> torch.Tensor:
                    attend = CachedAttention(k_pools, v_pools, batch, **kernels)
                    logits: torch.Tensor = model(
                        self._ids[0, :bucket], self._ids[1, :bucket], attend
                    )
                    return logits

                side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    forward()  # warm-up outside the capture, as CUDA graphs require
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._logits[bucket] = forward()
                self._graphs[bucket] = graph

    @property
    def max_batch_seqs(self) -> int:
        """The largest captured batch."""
        return self.buckets[-1]

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        kv_starts: list[int],
        kv_lens: list[int],
    ) -> torch.Tensor:
        """Logits (B, vocab) float32 of one decode token per sequence (B <= max_batch_seqs).

        Sequence b feeds token_ids[b] at positions[b], writes its KV at row
        kv_starts[b] + kv_lens[b] - 1 and attends rows kv_starts[b] + [0, kv_lens[b]).
        """
        num_seqs = len(token_ids)
        bucket = next(b for b in self.buckets if b >= num_seqs)
        pad = bucket - num_seqs
        scratch = self._scratch_row
        slots = [s + n - 1 for s, n in zip(kv_starts, kv_lens, strict=True)]
        host_ids = torch.tensor(
            [token_ids + [0] * pad, positions + [0] * pad, slots + [scratch] * pad],
            dtype=torch.int64,
        )
        host_kv = torch.tensor(
            [kv_starts + [scratch] * pad, kv_lens + [1] * pad], dtype=torch.int32
        )
        self._ids[:, :bucket].copy_(host_ids, non_blocking=True)
        self._kv[:, :bucket].copy_(host_kv, non_blocking=True)
        self._graphs[bucket].replay()
        return self._logits[bucket][:num_seqs]

    def _reset_inputs(self) -> None:
        """Point every row at the scratch row, so warm-up and capture touch no request's KV."""
        self._ids.zero_()
        self._ids[2].fill_(self._scratch_row)
        self._kv[0].fill_(self._scratch_row)
        self._kv[1].fill_(1)

    def _static_batch(self, bucket: int, max_kv_tokens: int) -> AttentionBatch:
        """An AttentionBatch over the static buffers; lengths are read on the device."""
        empty = self._kv[0, :0]
        return AttentionBatch(
            num_new_tokens=(1,) * bucket,
            num_kv_tokens=(max_kv_tokens,) * bucket,  # only bounds max_seqlen_k
            kv_starts=(self._scratch_row,) * bucket,
            num_decodes=bucket,
            slot_mapping=self._ids[2, :bucket],
            decode_kv_starts=self._kv[0, :bucket],
            decode_kv_lens=self._kv[1, :bucket],
            prefill_cu_q=empty,
            prefill_kv_starts=empty,
            prefill_kv_lens=empty,
        )


def capture_verified_graphs(
    model: LlamaForCausalLM,
    kv: KVCache,
    *,
    max_batch_seqs: int,
    max_kv_tokens: int,
    scratch_row: int,
    kernels: dict[str, bool],
) -> DecodeGraphs:
    """Capture decode graphs and check one replay against the eager forward.

    Raises RuntimeError when capture fails or the replay differs; the engine then runs eagerly.
    """
    graphs = DecodeGraphs(
        model,
        kv.k_pools,
        kv.v_pools,
        max_batch_seqs=max_batch_seqs,
        max_kv_tokens=max_kv_tokens,
        scratch_row=scratch_row,
        kernels=kernels,
    )
    device = kv.pool.device
    got = graphs.run([0], [0], [scratch_row], [1])
    batch = make_attention_batch([1], [1], [scratch_row], device)
    attend = CachedAttention(kv.k_pools, kv.v_pools, batch, **kernels)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    with torch.inference_mode():
        want = model(zero, zero, attend)
    if not torch.allclose(got, want, atol=1e-1, rtol=1e-2):
        raise RuntimeError("CUDA graph replay differs from the eager forward")
    return graphs
