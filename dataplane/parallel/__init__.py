"""Sequence parallelism (Ulysses, ring), dynamic process groups, KV transfer."""
