"""GPU memory shares: several workers on one GPU, each with an explicit share that must fit.

A worker's share is its weights + its KV pool (the configured budget) + the engine's
activation reserve at its token budget + a CUDA context. The shares of the workers placed on
one GPU must fit in `memory_fraction` of that GPU's memory; the agent computes this before it
starts any worker and refuses clearly (with the numbers) when they do not, instead of letting
the last worker run out of memory while loading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

CUDA_CONTEXT_BYTES = 1 << 30  # per process: CUDA context, cuBLAS/NCCL handles (measured < 1 GiB)
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class WorkerMemory:
    """What one worker takes on its GPU, in bytes."""

    weights_bytes: int  # parameters in the serving dtype
    kv_bytes: int  # the KV pool (the configured budget, rounded down to whole tokens)
    activation_bytes: int  # the engine's reserve for one iteration at its token budget
    context_bytes: int = CUDA_CONTEXT_BYTES  # CUDA context and library handles

    @property
    def total_bytes(self) -> int:
        """The whole share."""
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.context_bytes


def check_gpu_shares(
    device_indices: list[int],
    share: WorkerMemory,
    gpu_total_bytes: dict[int, int],
    memory_fraction: float,
) -> None:
    """Raise ValueError naming the numbers when the workers placed on a GPU do not fit it.

    Args:
        device_indices: each worker's GPU index.
        share: one worker's memory (every worker of an agent serves the same model).
        gpu_total_bytes: each GPU's memory.
        memory_fraction: share of a GPU's memory the workers may take together.
    """
    for device, num_workers in sorted(Counter(device_indices).items()):
        usable = int(memory_fraction * gpu_total_bytes[device])
        need = num_workers * share.total_bytes
        if need > usable:
            raise ValueError(
                f"{num_workers} workers do not fit GPU {device}: each needs "
                f"{share.total_bytes / GIB:.1f} GiB (weights {share.weights_bytes / GIB:.1f} + "
                f"KV {share.kv_bytes / GIB:.1f} + activations "
                f"{share.activation_bytes / GIB:.1f} + CUDA context "
                f"{share.context_bytes / GIB:.1f}), {need / GIB:.1f} GiB in all, but "
                f"{memory_fraction:.0%} of the GPU's {gpu_total_bytes[device] / GIB:.1f} GiB is "
                f"{usable / GIB:.1f} GiB: lower --kv-budget or run fewer workers per GPU"
            )
