"""Analytic cost model: how long one engine iteration, an SP prefill chunk or a KV transfer takes.

Notation (one model instance = `tp` GPUs of one node; an SP group = `k` instances):

    P_mm   matmul parameters (all layers + lm_head)          L   layers      d  hidden size
    H      query heads, hd head dim, kv KV heads (GQA)        b   dtype bytes (2 for bf16)
    T      new tokens in the iteration                        C   tokens already in the KV cache
    kvb    KV bytes per token = 2 · L · kv · hd · b           S   logit rows (one per sequence)

FLOPs of one iteration (multiply-add = 2 FLOPs):

    linear     = 2 · (P_mm − V·d) · T + 2 · V · d · S        every new token through every layer,
                                                             the lm_head only for the last token
    attention  = 4 · L · H · hd · pairs                      QKᵀ and PV, 2·hd FLOPs each per head
    pairs      = Σ over new tokens of the keys they attend to
               = T · C + T · (T + 1) / 2  for a causal prefill chunk after C cached tokens
               = Σ_b (C_b + 1)            for a decode batch (one new token per sequence)

    A full causal prefill of T tokens therefore costs ≈ 2·P_mm·T + 2 · L · (H·hd) · T² FLOPs.

Bytes moved from HBM per iteration (weights are read once per iteration, whatever the batch):

    bytes = P_mm · b + kvb · (kv_read_tokens + T)            cached KV read once, new KV written

Time of an iteration on one instance:

    t = max(FLOPs / (tp · peak · mfu), bytes / (tp · hbm · bw_eff)) + allreduce + overhead
    allreduce = 2 · L · [2 · (tp − 1)/tp · T · d · b / nvlink + 2 · (tp − 1) · latency]  (ring)

`mfu` (achieved fraction of peak FLOP/s) dominates prefill, `bw_eff` (achieved fraction of HBM
bandwidth) dominates decode; `overhead_s` is the fixed per-iteration cost (launches, sampling,
scheduling). All three come from `Efficiency` and can be fitted to measurements
(`sim.calibration`).

Sequence parallelism over k instances (the chunk's T tokens split into k shards of T/k):

* Ulysses (fast SP): all-to-all turns sequence shards into head shards before attention and back
  after it. Per layer each GPU sends (k−1)/k of its shard of Q, K, V and O:
  `(T/k) · (2·H + 2·kv) · hd · b / tp` bytes. Every instance computes all pairs for H/k heads, so
  the attention FLOPs divide evenly by k; the KV cache stays head-sharded, so cached context never
  moves.
* Ring attention: K/V shards circulate k−1 steps per layer, including the cached context's
  shards: `(k−1) · (C + T)/k · 2 · kv · hd · b / tp` bytes per GPU per layer. With contiguous
  shards and a causal mask the last shard does the most work, `(T/k) · (C + T − T/(2k))` pairs;
  communication overlaps compute, so the attention part costs max(critical compute, transfer).

Links: NVLink when the whole group sits in one node (k · tp ≤ gpus_per_node and the caller says
so), the per-GPU network bandwidth otherwise, both scaled by `comm_eff`.

KV memory: `kvb` bytes per token; capacity per instance = tp · memory · utilisation − weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from sim.hardware import GpuSpec, ModelShape

SpMode = Literal["ulysses", "ring"]


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Achieved fractions of peak and the fixed per-iteration overhead."""

    mfu: float = 0.5  # achieved / peak FLOP/s (prefill-dominated iterations)
    bw_eff: float = 0.75  # achieved / peak HBM bandwidth (decode-dominated iterations)
    overhead_s: float = 0.003  # fixed cost of every iteration
    comm_eff: float = 0.8  # achieved / nominal NVLink or network bandwidth

    def __post_init__(self) -> None:
        for name in ("mfu", "bw_eff", "comm_eff"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Efficiency.{name} must be in (0, 1], got {value}")
        if self.overhead_s < 0.0:
            raise ValueError(f"Efficiency.overhead_s must be >= 0, got {self.overhead_s}")


@dataclass(frozen=True, slots=True)
class CostModel:
    """Latency of work on instances of `tp` GPUs of type `gpu` serving `model`."""

    model: ModelShape
    gpu: GpuSpec
    tp: int = 1  # tensor-parallel GPUs per instance
    efficiency: Efficiency = Efficiency()
    memory_utilization: float = 0.9  # fraction of HBM for weights + KV (the rest: activations)
    # Constants of the formulas, derived once in __post_init__ (the engine calls these a lot).
    _c: _Constants = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.tp > self.gpu.gpus_per_node:
            raise ValueError(
                f"CostModel.tp must be in [1, {self.gpu.gpus_per_node}], got {self.tp}"
            )
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ValueError(
                f"CostModel.memory_utilization must be in (0, 1], got {self.memory_utilization}"
            )
        if self.kv_capacity_tokens <= 0:
            raise ValueError(
                f"{self.model.name} ({self.model.weight_bytes / 1e9:.1f} GB of weights) does not "
                f"fit on tp={self.tp} x {self.gpu.name}"
            )
        m, g, e = self.model, self.gpu, self.efficiency
        lm_head = m.vocab_size * m.hidden_size
        nvlink = g.nvlink_bytes_per_s * e.comm_eff
        tp_share = 2.0 * (self.tp - 1) / self.tp
        constants = _Constants(
            linear_flops_per_token=2.0 * (m.matmul_params - lm_head),
            head_flops_per_row=2.0 * lm_head,
            attn_flops_per_pair=4.0 * m.num_layers * m.num_heads * m.head_dim,
            weight_bytes=float(m.matmul_params * m.dtype_bytes),
            kv_bytes_per_token=float(m.kv_bytes_per_token),
            flops_per_s=self.tp * g.peak_flops * e.mfu,
            bytes_per_s=self.tp * g.hbm_bytes_per_s * e.bw_eff,
            allreduce_s_per_token=2.0
            * m.num_layers
            * tp_share
            * m.hidden_size
            * m.dtype_bytes
            / nvlink,
            allreduce_fixed_s=2.0 * m.num_layers * 2.0 * (self.tp - 1) * g.nvlink_latency_s,
        )
        object.__setattr__(self, "_c", constants)

    def with_efficiency(self, efficiency: Efficiency) -> CostModel:
        """A copy using `efficiency` (e.g. a fitted calibration)."""
        return replace(self, efficiency=efficiency)

    # --- memory -------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of the whole instance (all tp shards together)."""
        return self.model.kv_bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one instance holds: (tp · memory · utilisation − weights) / kvb."""
        free = self.tp * self.gpu.memory_bytes * self.memory_utilization - self.model.weight_bytes
        return int(free // self.model.kv_bytes_per_token)

    # --- FLOPs and bytes ----------------------------------------------------------------------

    def flops(self, new_tokens: int, attn_pairs: float, logit_rows: int) -> float:
        """FLOPs of `new_tokens` through the model, `attn_pairs` query-key pairs, S logit rows."""
        c = self._c
        return (
            c.linear_flops_per_token * new_tokens
            + c.head_flops_per_row * logit_rows
            + c.attn_flops_per_pair * attn_pairs
        )

    def hbm_bytes(self, new_tokens: int, kv_read_tokens: float) -> float:
        """HBM bytes: weights once, cached KV read once, new KV written."""
        c = self._c
        return c.weight_bytes + c.kv_bytes_per_token * (kv_read_tokens + new_tokens)

    def allreduce_s(self, new_tokens: int) -> float:
        """Tensor-parallel all-reduces of one iteration (2 per layer, ring over NVLink)."""
        if self.tp == 1:
            return 0.0
        return self._c.allreduce_s_per_token * new_tokens + self._c.allreduce_fixed_s

    def _roofline_s(self, flops: float, hbm_bytes: float) -> float:
        c = self._c
        return max(flops / c.flops_per_s, hbm_bytes / c.bytes_per_s)

    # --- iterations ---------------------------------------------------------------------------

    def iteration_s(
        self,
        prefill_tokens: int,
        prefill_pairs: float,
        prefill_context_tokens: float,
        prefill_seqs: int,
        decode_batch: int,
        decode_context_tokens: float,
    ) -> float:
        """One continuous-batching iteration on one instance.

        Args:
            prefill_tokens: new prompt tokens (all prefill chunks of the iteration).
            prefill_pairs: attention pairs of those chunks (`causal_pairs` of each, summed).
            prefill_context_tokens: cached tokens those chunks attend to (read from HBM).
            prefill_seqs: prefill chunks in the iteration (logit rows).
            decode_batch: sequences decoding one token each.
            decode_context_tokens: their cached tokens, summed.
        """
        new = prefill_tokens + decode_batch
        pairs = prefill_pairs + decode_context_tokens + decode_batch
        flops = self.flops(new, pairs, prefill_seqs + decode_batch)
        hbm = self.hbm_bytes(new, prefill_context_tokens + decode_context_tokens)
        return self._roofline_s(flops, hbm) + self.allreduce_s(new) + self.efficiency.overhead_s

    def prefill_s(self, tokens: int, context_tokens: int = 0) -> float:
        """A prefill chunk of `tokens` after `context_tokens` cached ones, alone on one instance."""
        return self.iteration_s(
            tokens, causal_pairs(tokens, context_tokens), context_tokens, 1, 0, 0
        )

    def decode_s(self, batch: int, context_tokens: float) -> float:
        """One decode iteration of `batch` sequences holding `context_tokens` cached in total."""
        return self.iteration_s(0, 0.0, 0.0, 0, batch, context_tokens)

    def sp_prefill_s(
        self,
        tokens: int,
        context_tokens: int,
        sp_degree: int,
        mode: SpMode = "ulysses",
        cross_node: bool = False,
    ) -> float:
        """A prefill chunk split over `sp_degree` instances (see the module docstring)."""
        if sp_degree < 1:
            raise ValueError(f"sp_degree must be >= 1, got {sp_degree}")
        if sp_degree == 1:
            return self.prefill_s(tokens, context_tokens)
        m, k, e = self.model, sp_degree, self.efficiency
        shard = tokens / k
        linear = self.flops(int(round(shard)), 0.0, 1)
        hbm = self.hbm_bytes(int(round(shard)), context_tokens / k)
        link = self._link_bytes_per_s(cross_node)
        latency = self.gpu.network_latency_s if cross_node else self.gpu.nvlink_latency_s
        attn_per_pair = 4.0 * m.num_layers * m.num_heads * m.head_dim
        peak = self.tp * self.gpu.peak_flops * e.mfu
        if mode == "ulysses":
            attn = attn_per_pair * causal_pairs(tokens, context_tokens) / k
            a2a = shard * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim * m.dtype_bytes
            comm = m.num_layers * (a2a / self.tp * (k - 1) / k / link + 2 * latency)
            body = self._roofline_s(linear + attn, hbm) + comm
        elif mode == "ring":
            critical_pairs = shard * (context_tokens + tokens - shard / 2.0)
            attn_s = attn_per_pair * critical_pairs / peak
            kv_shard = (context_tokens + tokens) / k * 2 * m.num_kv_heads * m.head_dim
            p2p = m.num_layers * (k - 1) * (kv_shard * m.dtype_bytes / self.tp / link + latency)
            body = self._roofline_s(linear, hbm) + max(attn_s, p2p)
        else:
            raise ValueError(f"sp mode must be 'ulysses' or 'ring', got {mode!r}")
        return body + self.allreduce_s(int(round(shard))) + e.overhead_s

    def kv_transfer_s(self, tokens: int, cross_node: bool) -> float:
        """Moving `tokens` of KV between two instances (tp GPU pairs in parallel)."""
        nbytes = tokens * self.model.kv_bytes_per_token / self.tp
        latency = self.gpu.network_latency_s if cross_node else self.gpu.nvlink_latency_s
        return nbytes / self._link_bytes_per_s(cross_node) + latency

    def _link_bytes_per_s(self, cross_node: bool) -> float:
        g = self.gpu
        nominal = g.network_bytes_per_s if cross_node else g.nvlink_bytes_per_s
        return nominal * self.efficiency.comm_eff


@dataclass(frozen=True, slots=True)
class _Constants:
    """Per-(model, gpu, tp, efficiency) factors of the formulas in the module docstring."""

    linear_flops_per_token: float  # 2 · (P_mm − V·d)
    head_flops_per_row: float  # 2 · V · d
    attn_flops_per_pair: float  # 4 · L · H · hd
    weight_bytes: float  # P_mm · b
    kv_bytes_per_token: float  # kvb
    flops_per_s: float  # tp · peak · mfu
    bytes_per_s: float  # tp · hbm · bw_eff
    allreduce_s_per_token: float  # 2 · L · 2(tp−1)/tp · d · b / nvlink
    allreduce_fixed_s: float  # 2 · L · 2(tp−1) · latency


def causal_pairs(tokens: int, context_tokens: int) -> float:
    """Query-key pairs of a causal chunk of `tokens` after `context_tokens`: T·C + T·(T+1)/2."""
    return tokens * context_tokens + tokens * (tokens + 1) / 2.0
