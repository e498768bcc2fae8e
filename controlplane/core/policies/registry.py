"""Policies by name: `make_policy(name, config, rng)` and `policy_names()`.

Adding a policy is a new file in policies/ and one line in `_FACTORIES`. Baselines run with
their defining settings forced (no preemption, no disaggregation, a short prefill may stall a
long decode; distserve disaggregates every request into a fixed decode pool); the PecSched
ablations flip exactly one switch of the given config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.policies.distserve import DistServePolicy
from controlplane.core.policies.fifo import FifoPolicy
from controlplane.core.policies.pecsched import PecSchedPolicy
from controlplane.core.policies.priority import PriorityPolicy
from controlplane.core.policies.reservation import ReservationPolicy
from controlplane.core.policies.sarathi import SarathiPolicy
from controlplane.core.policy import Policy
from controlplane.core.tiebreak import SeededTiebreak, Tiebreak
from controlplane.core.types import SpKind

if TYPE_CHECKING:
    import random

_Factory = Callable[[str, SchedulerConfig, Tiebreak], Policy]


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
    "sarathi": (SarathiPolicy, _baseline),
    "distserve": (
        DistServePolicy,
        lambda c: replace(_baseline(c), disaggregation=True, short_decode_elastic=False),
    ),
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


def make_policy(
    name: str, config: SchedulerConfig | None = None, rng: random.Random | int = 0
) -> Policy:
    """Build the policy called `name`.

    Args:
        name: one of `policy_names()`.
        config: thresholds and switches; defaults to `SchedulerConfig()` (the paper's).
        rng: a seeded `random.Random`, or an int seed for the core's own generator. The
            policy draws from it only to break ties between equally good instances (one draw
            per InstanceUp), so the same seed and events give the same decisions.

    Raises:
        KeyError: unknown name; the message lists the supported names.
    """
    entry = _FACTORIES.get(name)
    if entry is None:
        raise KeyError(f"Unsupported policy {name!r}. Supported policies: {list(_FACTORIES)}")
    factory, adjust = entry
    tiebreak = SeededTiebreak(rng) if isinstance(rng, int) else rng
    return factory(name, adjust(config or SchedulerConfig()), tiebreak)
