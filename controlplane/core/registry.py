"""Policies by name: `make_policy(name, rng, config)` and `policy_names()`.

Adding a policy is a new file in policies/ and one line in `_FACTORIES`. Baselines run with
their defining settings forced (no preemption, no disaggregation, a short prefill may stall a
long decode); the PecSched ablations flip exactly one switch of the given config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.policies.fifo import FifoPolicy
from controlplane.core.policies.pecsched import PecSchedPolicy
from controlplane.core.policies.priority import PriorityPolicy
from controlplane.core.policies.reservation import ReservationPolicy
from controlplane.core.policy import Policy
from controlplane.core.types import SpKind

if TYPE_CHECKING:
    import random

_Factory = Callable[[str, SchedulerConfig, "random.Random"], Policy]


def _baseline(config: SchedulerConfig) -> SchedulerConfig:
    return replace(
        config,
        preemption=False,
        disaggregation=False,
        long_decode_sharing=LongDecodeSharing.STALL,
    )


_FACTORIES: dict[str, tuple[_Factory, Callable[[SchedulerConfig], SchedulerConfig]]] = {
    "fifo": (FifoPolicy, _baseline),
    "reservation": (ReservationPolicy, _baseline),
    "priority": (PriorityPolicy, _baseline),
    "pecsched": (PecSchedPolicy, lambda c: c),
    "pecsched-no-preempt": (PecSchedPolicy, lambda c: replace(c, preemption=False)),
    "pecsched-no-disagg": (PecSchedPolicy, lambda c: replace(c, disaggregation=False)),
    "pecsched-no-coloc": (
        PecSchedPolicy,
        lambda c: replace(c, long_decode_sharing=LongDecodeSharing.STALL),
    ),
    "pecsched-ring": (PecSchedPolicy, lambda c: replace(c, sp_kind=SpKind.RING)),
}


def policy_names() -> tuple[str, ...]:
    """Names `make_policy` accepts, in a stable order (baselines, pecsched, ablations)."""
    return tuple(_FACTORIES)


def make_policy(name: str, rng: random.Random, config: SchedulerConfig | None = None) -> Policy:
    """Build the policy called `name`.

    Args:
        name: one of `policy_names()`.
        rng: seeded generator; the policy draws from it only to break ties between equally
            good instances, so the same seed and events give the same decisions.
        config: thresholds and switches; defaults to `SchedulerConfig()` (the paper's).

    Raises:
        KeyError: unknown name; the message lists the supported names.
    """
    entry = _FACTORIES.get(name)
    if entry is None:
        raise KeyError(f"Unsupported policy {name!r}. Supported policies: {list(_FACTORIES)}")
    factory, adjust = entry
    return factory(name, adjust(config or SchedulerConfig()), rng)
