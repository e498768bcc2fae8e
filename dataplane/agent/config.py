"""The agent's configuration: one frozen value built once from the command line and the
environment (the only place of the agent that reads environment variables)."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

OTEL_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the OpenTelemetry standard variable

ROLES = ("general", "short_decode", "long_reserved")

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


@dataclass(frozen=True, slots=True)
class KvBudget:
    """KV pool size per worker: a token count or a byte count (exactly one is set)."""

    tokens: int | None  # KV rows
    num_bytes: int | None  # bytes of K and V over all layers


def parse_kv_budget(text: str) -> KvBudget:
    """`4096` -> 4096 tokens; `64MiB`, `2GB`, `1000000B` -> bytes. ValueError names the flag."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if match is None:
        raise ValueError(f"--kv-budget {text!r}: expected TOKENS or a size such as 512MiB")
    value, unit = int(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"--kv-budget {text!r}: must be positive")
    if unit in ("", "tokens", "tok"):
        return KvBudget(tokens=value, num_bytes=None)
    if unit not in _BYTE_UNITS:
        raise ValueError(
            f"--kv-budget {text!r}: unknown unit {unit!r} (use tokens or {', '.join(_BYTE_UNITS)})"
        )
    return KvBudget(tokens=None, num_bytes=value * _BYTE_UNITS[unit])


def parse_roles(text: str | None, num_workers: int) -> tuple[str, ...]:
    """Comma-separated roles, one per worker (default: all general); ValueError names the flag."""
    if text is None:
        return ("general",) * num_workers
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    if len(roles) != num_workers:
        raise ValueError(f"--roles lists {len(roles)} roles for --workers {num_workers}")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"--roles: unknown role {role!r} (roles: {', '.join(ROLES)})")
    return roles


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent reads at start; never mutated."""

    controlplane: str  # host:port of the control plane's gRPC server
    device: str  # "cpu" or "cuda"
    num_workers: int  # worker processes (one per GPU or CPU slot)
    model: str  # preset name or local HF directory
    roles: tuple[str, ...]  # one role per worker
    kv_budget: KvBudget | None  # per worker; None: 4096 tokens on CPU, free memory on CUDA
    node_id: str  # this node's id (instance ids: `instance_id`)
    api_key: str | None  # sent as `authorization: Bearer <key>`
    seed: int = 0  # weight seed for presets (must match the other agents')
    dtype: str | None = None  # float32|bfloat16|float16; None: fp32 on CPU, bf16 on CUDA
    max_batch_tokens: int = 2048  # engine tokens per iteration
    rendezvous_host: str = "127.0.0.1"  # address the rendezvous store binds and advertises
    rendezvous_port: int = 0  # 0: any free port
    group_timeout_s: float = 30.0  # torch.distributed rendezvous / collective timeout
    drain_timeout_s: float = 60.0  # SIGTERM: longest wait for running work before handing back
    reconnect_max_backoff_s: float = 5.0  # longest wait between attach attempts
    threads_per_worker: int = 1  # torch intra-op threads per CPU worker
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for the agent's spans; None: off

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.num_workers}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if len(self.roles) != self.num_workers:
            raise ValueError(
                f"--roles has {len(self.roles)} entries for {self.num_workers} workers"
            )
        if not self.node_id or "/" in self.node_id:
            raise ValueError(f"--node-id {self.node_id!r} must be non-empty without '/'")
        if ":" not in self.controlplane:
            raise ValueError(f"--controlplane {self.controlplane!r} must be host:port")
        for name in ("group_timeout_s", "drain_timeout_s", "reconnect_max_backoff_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def instance_id(self, index: int) -> str:
        """The id of worker `index`'s instance."""
        return instance_id(self.node_id, index)


def instance_id(node_id: str, index: int) -> str:
    """The id of the instance of worker `index` of node `node_id`."""
    return f"{node_id}/{index}"


def default_node_id() -> str:
    """The host name (without '/'), the default --node-id."""
    return socket.gethostname().replace("/", "-") or "node"


def otlp_endpoint(flag: str | None, env: Mapping[str, str]) -> str | None:
    """--otlp-endpoint, else OTEL_EXPORTER_OTLP_ENDPOINT, else None (no spans exported)."""
    return flag or env.get(OTEL_ENDPOINT_ENV) or None
