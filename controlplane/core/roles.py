"""Role plans: which role a policy gives each instance as it comes up.

An instance registered with a role the policy uses keeps it; a GENERAL one may be given the
policy's special role until the configured share is met. The first instance up is always
GENERAL, so a cluster of one can serve everything. Roles are not rebalanced when instances go
down; the next instances to come up fill the gap.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.core.accounting import max_group_tokens
from controlplane.core.config import SchedulerConfig
from controlplane.core.types import InstanceRole, InstanceSpec


@dataclass(slots=True)
class RoleCensus:
    """Instances up, by effective role: counts, GPUs and sorted KV capacities."""

    num_instances: dict[InstanceRole, int] = field(default_factory=dict)
    num_gpus: dict[InstanceRole, int] = field(default_factory=dict)
    capacities_tokens: dict[InstanceRole, list[int]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so admission verdicts can be cached

    def add(self, role: InstanceRole, spec: InstanceSpec) -> None:
        """Count an instance that came up with `role`."""
        self.version += 1
        self.num_instances[role] = self.num_instances.get(role, 0) + 1
        self.num_gpus[role] = self.num_gpus.get(role, 0) + spec.tp
        bisect.insort(self.capacities_tokens.setdefault(role, []), spec.kv_capacity_tokens)

    def remove(self, role: InstanceRole, spec: InstanceSpec) -> None:
        """Uncount an instance that went down."""
        self.version += 1
        self.num_instances[role] -= 1
        self.num_gpus[role] -= spec.tp
        capacities = self.capacities_tokens[role]
        del capacities[bisect.bisect_left(capacities, spec.kv_capacity_tokens)]

    def count(self, role: InstanceRole) -> int:
        """Instances up with `role`."""
        return self.num_instances.get(role, 0)

    def capacities(self, role: InstanceRole) -> list[int]:
        """KV capacities of the instances with `role`, ascending (do not mutate)."""
        return self.capacities_tokens.get(role, [])


RolePlan = Callable[[InstanceSpec, RoleCensus], InstanceRole]


def all_general(spec: InstanceSpec, census: RoleCensus) -> InstanceRole:
    """Every instance is GENERAL (fifo, priority)."""
    return InstanceRole.GENERAL


def short_decode_plan(config: SchedulerConfig) -> RolePlan:
    """PecSched: SHORT_DECODE up to `num_short_decode_instances` or the GPU fraction."""

    def assign(spec: InstanceSpec, census: RoleCensus) -> InstanceRole:
        if spec.role is InstanceRole.SHORT_DECODE:
            return InstanceRole.SHORT_DECODE
        if census.count(InstanceRole.GENERAL) == 0:
            return InstanceRole.GENERAL
        wanted = config.num_short_decode_instances
        if wanted is not None:
            short = census.count(InstanceRole.SHORT_DECODE) < wanted
        else:
            total_gpus = sum(census.num_gpus.values()) + spec.tp
            short_gpus = census.num_gpus.get(InstanceRole.SHORT_DECODE, 0) + spec.tp
            short = short_gpus <= config.short_decode_gpu_fraction * total_gpus + 1e-9
        return InstanceRole.SHORT_DECODE if short else InstanceRole.GENERAL

    return assign


def reservation_plan(config: SchedulerConfig) -> RolePlan:
    """Reservation: LONG_RESERVED up to the configured count, or until the reserve can hold
    `reservation_sized_for_tokens` in one SP group."""

    def assign(spec: InstanceSpec, census: RoleCensus) -> InstanceRole:
        if spec.role is InstanceRole.LONG_RESERVED:
            return InstanceRole.LONG_RESERVED
        if census.count(InstanceRole.GENERAL) == 0:
            return InstanceRole.GENERAL
        reserved = census.count(InstanceRole.LONG_RESERVED)
        wanted = config.num_long_reserved_instances
        if wanted is not None:
            more = reserved < wanted
        else:
            held = max_group_tokens(
                census.capacities(InstanceRole.LONG_RESERVED), config.max_sp_degree
            )
            more = held < config.reservation_sized_for_tokens and reserved < config.max_sp_degree
        return InstanceRole.LONG_RESERVED if more else InstanceRole.GENERAL

    return assign
