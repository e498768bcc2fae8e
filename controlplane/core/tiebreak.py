"""Tie-breaking randomness without importing `random`: the core only needs `random()`."""

from __future__ import annotations

from typing import Protocol

_MASK64 = (1 << 64) - 1


class Tiebreak(Protocol):
    """Anything with `random() -> float in [0, 1)`, e.g. a seeded `random.Random`."""

    def random(self) -> float:
        """Next float in [0, 1)."""
        ...


class SeededTiebreak:
    """SplitMix64 stream from an int seed: deterministic, pure, good enough for tie-breaks."""

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    def random(self) -> float:
        """Next float in [0, 1) (53 random bits)."""
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        return (z >> 11) / float(1 << 53)
