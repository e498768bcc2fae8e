"""Small builders for tests: specs, policies with instances up, and event shorthands."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from controlplane.core.config import SchedulerConfig
from controlplane.core.events import InstanceUp, RequestArrived
from controlplane.core.policies.registry import make_policy as _make_policy
from controlplane.core.policy import Policy
from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec


def make_instance(
    instance_id: str = "i0",
    *,
    node_id: str | None = None,
    role: InstanceRole = InstanceRole.GENERAL,
    tp: int = 1,
    kv_capacity_tokens: int = 1_000_000,
) -> InstanceSpec:
    """An instance spec; its node defaults to `node-<instance_id>`."""
    return InstanceSpec(
        instance_id=instance_id,
        node_id=node_id or f"node-{instance_id}",
        role=role,
        tp=tp,
        kv_capacity_tokens=kv_capacity_tokens,
    )


def make_instances(
    n: int, *, prefix: str = "i", kv_capacity_tokens: int = 1_000_000, **kwargs: Any
) -> list[InstanceSpec]:
    """`n` instance specs named prefix00, prefix01, ..."""
    return [
        make_instance(f"{prefix}{k:02d}", kv_capacity_tokens=kv_capacity_tokens, **kwargs)
        for k in range(n)
    ]


def make_request(
    request_id: str = "r0",
    *,
    prompt_tokens: int = 100,
    max_new_tokens: int = 10,
    priority: int = 0,
    arrival_s: float = 0.0,
    tenant: str = "tenant",
    deadline_s: float | None = None,
) -> RequestSpec:
    """A request spec (short by default)."""
    return RequestSpec(
        request_id=request_id,
        tenant=tenant,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        priority=priority,
        arrival_s=arrival_s,
        deadline_s=deadline_s,
    )


def make_requests(
    n: int, *, prefix: str = "r", arrival_s: float = 0.0, **kwargs: Any
) -> list[RequestSpec]:
    """`n` request specs named prefix0000, ... all arriving at `arrival_s`."""
    return [make_request(f"{prefix}{k:04d}", arrival_s=arrival_s, **kwargs) for k in range(n)]


def make_config(**overrides: Any) -> SchedulerConfig:
    """The default SchedulerConfig with `overrides` applied."""
    return replace(SchedulerConfig(), **overrides)


def make_policy(
    name: str = "pecsched",
    *,
    instances: Iterable[InstanceSpec] = (),
    seed: int = 0,
    **config_overrides: Any,
) -> Policy:
    """A policy from the registry with `instances` already up at time 0."""
    policy = _make_policy(name, make_config(**config_overrides), seed)
    policy.observe([InstanceUp(spec, 0.0) for spec in instances])
    return policy


def arrive(policy: Policy, *specs: RequestSpec) -> None:
    """Observe the arrival of `specs`, each at its own arrival time."""
    policy.observe([RequestArrived(spec, spec.arrival_s) for spec in specs])
