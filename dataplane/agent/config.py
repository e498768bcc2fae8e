"""The agent's configuration: one frozen value built once from the command line and the
environment (the only place of the agent that reads environment variables)."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

OTEL_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the OpenTelemetry standard variable
API_KEY_ENV = "PECSCHED_AGENT_API_KEY"  # the agent's key when neither flag gives one

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
class LinkTls:
    """TLS of the Attach link: PEM bytes read once at start."""

    root_certificates: bytes | None  # CA to verify the control plane with; None: system roots
    private_key: bytes | None  # client key for mutual TLS (with certificate_chain)
    certificate_chain: bytes | None  # client certificate (chain) for mutual TLS


def load_link_tls(
    tls: bool, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> LinkTls | None:
    """The link's TLS from the flags (None: plaintext); ValueError names the flag.

    `--tls-ca-file` or a client certificate implies TLS; `--tls` alone verifies the control
    plane against the system roots. `--tls-cert-file` and `--tls-key-file` go together.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("--tls-cert-file and --tls-key-file: give both or neither")
    if not (tls or ca_file or cert_file):
        return None
    return LinkTls(
        root_certificates=_read_file(ca_file, "--tls-ca-file"),
        private_key=_read_file(key_file, "--tls-key-file"),
        certificate_chain=_read_file(cert_file, "--tls-cert-file"),
    )


def load_api_key(flag: str | None, file: str | None, env: Mapping[str, str]) -> str | None:
    """The agent's API key: --api-key, else the first line of --api-key-file, else the
    PECSCHED_AGENT_API_KEY variable, else None. ValueError names the flag.

    A file or the variable keeps the key out of the process list (`ps` shows flags).
    """
    if flag is not None and file is not None:
        raise ValueError("--api-key and --api-key-file: give one of them")
    if file is not None:
        lines = (_read_file(file, "--api-key-file") or b"").decode(errors="replace").splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {file!r}: the file holds no key")
        return key
    return flag or env.get(API_KEY_ENV) or None


def _read_file(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: {exc.strerror or exc}") from exc


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
    tls: LinkTls | None = None  # TLS of the Attach link; None: plaintext

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
