"""Model shapes and GPU types the cost model is built from.

Every number here is a published architecture or data-sheet value; nothing is fitted. The
efficiency factors that turn peak numbers into achieved ones live in `sim.cost_model`
(`Efficiency`) and can be fitted from measurements (`sim.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A decoder-only transformer (Llama family: GQA attention + SwiGLU MLP)."""

    name: str  # preset name, e.g. "mistral-7b"
    num_layers: int  # decoder layers
    hidden_size: int  # model width d
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads (GQA); == num_heads for plain MHA
    head_dim: int  # per-head width; H * head_dim == hidden_size for all presets
    intermediate_size: int  # SwiGLU inner width
    vocab_size: int  # embedding rows
    tied_embeddings: bool = False  # lm_head shares the embedding matrix
    dtype_bytes: int = 2  # bf16 weights, activations and KV cache

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelShape.{field} must be > 0, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelShape.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: q,o (d·H·hd each), k,v (d·kv·hd each), 3·d·I MLP."""
        d = self.hidden_size
        attn = 2 * d * self.num_heads * self.head_dim + 2 * d * self.num_kv_heads * self.head_dim
        return attn + 3 * d * self.intermediate_size + 2 * d  # + the two RMSNorm weights

    @property
    def matmul_params(self) -> int:
        """Parameters every token multiplies through: all layers plus the lm_head."""
        return self.num_layers * self.layer_params + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters (the input embedding counts once more unless tied)."""
        embed = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.matmul_params + embed

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at `dtype_bytes`."""
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token: 2 (K and V) · layers · kv_heads · head_dim · dtype_bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU type: peak dense bf16 compute, HBM, and the links between GPUs."""

    name: str  # "a100" or "h100"
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float  # HBM bandwidth
    memory_bytes: float  # HBM capacity
    nvlink_bytes_per_s: float  # per-GPU NVLink bandwidth inside a node (unidirectional-sum spec)
    network_bytes_per_s: float  # per-GPU network bandwidth between nodes (one NIC per GPU)
    gpus_per_node: int = 8  # GPUs sharing one NVLink domain
    nvlink_latency_s: float = 8e-6  # per collective step inside a node
    network_latency_s: float = 2e-5  # per collective step across nodes


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32000),
        ModelShape("phi-3-14b", 40, 5120, 40, 10, 128, 17920, 32064),
        ModelShape("yi-34b", 60, 7168, 56, 8, 128, 20480, 64000),
        ModelShape("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelShape("llama-3.2-1b", 16, 2048, 32, 8, 64, 8192, 128256, tied_embeddings=True),
    )
}

# A100-80GB SXM: 312 TFLOP/s bf16, 2.0 TB/s, NVLink3 600 GB/s, 8x HDR 200 Gb/s NICs (25 GB/s).
# H100-80GB SXM: 989 TFLOP/s bf16, 3.35 TB/s, NVLink4 900 GB/s, 8x NDR 400 Gb/s NICs (50 GB/s).
GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", 312e12, 2.0e12, 80 * GB, 600 * GB, 25 * GB),
    "h100": GpuSpec("h100", 989e12, 3.35e12, 80 * GB, 900 * GB, 50 * GB),
}

# Paper deployment per model on 32 GPUs: tensor parallelism of one instance and the number of
# GPUs dedicated to short decode (4 TP1 replicas for 7B/14B, 1 TP4 replica for 34B/70B).
PAPER_TP: dict[str, int] = {
    "mistral-7b": 1,
    "phi-3-14b": 1,
    "llama-3-8b": 1,
    "llama-3.2-1b": 1,
    "yi-34b": 4,
    "llama-3.1-70b": 4,
}


def model_shape(name: str) -> ModelShape:
    """The preset `name`; KeyError lists the supported names."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"model: unsupported {name!r}; supported: {sorted(MODELS)}") from None


def gpu_spec(name: str) -> GpuSpec:
    """The GPU type `name`; KeyError lists the supported names."""
    try:
        return GPUS[name]
    except KeyError:
        raise KeyError(f"gpu: unsupported {name!r}; supported: {sorted(GPUS)}") from None
