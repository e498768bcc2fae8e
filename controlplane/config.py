"""The control plane's frozen `Config`: defaults < `--config` TOML file < environment < flags.

This is the only module of the control plane that reads environment variables. Variables use
the `PECSCHED_` prefix and the upper-cased field name (`PECSCHED_DB_URL`,
`PECSCHED_HEARTBEAT_INTERVAL_S`, ...); the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is honoured
when `otlp_endpoint` is not set otherwise. The TOML file holds the same field names at the top
level and the scheduling thresholds (controlplane.core.config.SchedulerConfig) under
`[scheduler]`. `load_config` builds the Config once, in the composition root.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.types import SpKind

ENV_PREFIX = "PECSCHED_"
OTEL_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"


class TextTokenizer(StrEnum):
    """How the control plane turns `SubmitRequest.text` into token ids."""

    BYTE = "byte"  # UTF-8 bytes, token id = byte value (the data plane's default tokenizer)
    NONE = "none"  # refuse text prompts: send token_ids (or give the model's tokenizer dir)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the control-plane service (validated, immutable)."""

    db_url: str = field(
        default="sqlite:///pecsched.db",
        metadata={"help": "database URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"},
    )
    listen: str = field(default="127.0.0.1:50051", metadata={"help": "gRPC listen address"})
    policy: str = field(default="pecsched", metadata={"help": "scheduling policy name"})
    seed: int = field(default=0, metadata={"help": "seed of the policy's tie-breaking"})
    metrics_port: int | None = field(
        default=None, metadata={"help": "Prometheus text metrics on this HTTP port (0 = any)"}
    )
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "metrics bind address"})
    otlp_endpoint: str | None = field(
        default=None, metadata={"help": "OTLP gRPC endpoint for spans, e.g. http://jaeger:4317"}
    )
    auth_enabled: bool = field(
        default=True, metadata={"help": "require API keys (false only for local development)"}
    )
    tls_cert_file: str | None = field(
        default=None, metadata={"help": "PEM server certificate (chain); serves TLS when set"}
    )
    tls_key_file: str | None = field(
        default=None, metadata={"help": "PEM private key of tls_cert_file"}
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle; when set, callers must present a certificate it signed"},
    )
    heartbeat_interval_s: float = field(
        default=2.0, metadata={"help": "agent heartbeat period; 3 missed = agent lost"}
    )
    registration_timeout_s: float = field(
        default=10.0, metadata={"help": "an Attach stream must send Register within this time"}
    )
    tick_interval_s: float = field(
        default=0.25, metadata={"help": "scheduling tick when nothing happens (time rules)"}
    )
    max_submits_per_tick: int = field(
        default=2048, metadata={"help": "submits committed together in one transaction at most"}
    )
    max_new_tokens_limit: int = field(
        default=32_768, metadata={"help": "largest max_new_tokens a Submit may ask for"}
    )
    max_prompt_tokens: int = field(
        default=1_048_576, metadata={"help": "longest prompt accepted, in tokens"}
    )
    max_active_requests: int = field(
        default=100_000, metadata={"help": "unfinished requests at most (queue bound)"}
    )
    max_active_requests_per_tenant: int = field(
        default=20_000, metadata={"help": "unfinished requests of one tenant at most"}
    )
    prompt_budget_bytes: int = field(
        default=4 * 2**30,
        metadata={"help": "bytes of prompts held for unfinished requests at most (4 a token)"},
    )
    prompt_budget_bytes_per_tenant: int = field(
        default=2**30, metadata={"help": "bytes of prompts held for one tenant at most"}
    )
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "prompt token ids must be below this (the model's vocabulary size)"},
    )
    retry_after_s: float = field(
        default=1.0, metadata={"help": "back-off hint sent with RESOURCE_EXHAUSTED"}
    )
    text_tokenizer: TextTokenizer = field(
        default=TextTokenizer.BYTE, metadata={"help": "tokenizer of text prompts: byte | none"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "served model's directory with tokenizer.json (+ tokenizer_config.json, chat "
            "template): text and chat prompts use it; overrides text_tokenizer"
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model agents must register; None = the first agent's model"},
    )
    kv_transfer_timeout_s: float = field(
        default=60.0, metadata={"help": "timeout sent with each TransferKv command"}
    )
    scheduler: SchedulerConfig = field(
        default_factory=SchedulerConfig,
        metadata={"help": "scheduling thresholds ([scheduler] table of the config file)"},
    )

    def __post_init__(self) -> None:
        positive = {
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "registration_timeout_s": self.registration_timeout_s,
            "tick_interval_s": self.tick_interval_s,
            "max_submits_per_tick": self.max_submits_per_tick,
            "max_new_tokens_limit": self.max_new_tokens_limit,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_active_requests": self.max_active_requests,
            "max_active_requests_per_tenant": self.max_active_requests_per_tenant,
            "retry_after_s": self.retry_after_s,
            "prompt_budget_bytes": self.prompt_budget_bytes,
            "prompt_budget_bytes_per_tenant": self.prompt_budget_bytes_per_tenant,
            "kv_transfer_timeout_s": self.kv_transfer_timeout_s,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be > 0, got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be in [0, 65535], got {self.metrics_port}")
        if not self.listen or ":" not in self.listen:
            raise ValueError(f"listen: must be HOST:PORT, got {self.listen!r}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size: must be > 0, got {self.vocab_size}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file, tls_key_file: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file: needs tls_cert_file and tls_key_file")
        if not self.db_url:
            raise ValueError("db_url: must not be empty")


_SCHEDULER_ENUMS: dict[str, type[StrEnum]] = {
    "sp_kind": SpKind,
    "long_decode_sharing": LongDecodeSharing,
}


def load_config(
    *,
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults, then `file` (TOML), then `env`, then `overrides` (flags).

    Args:
        file: a TOML file with Config fields at the top level and `[scheduler]` thresholds.
        env: the process environment (the composition root passes `os.environ`); None = none.
        overrides: values from command-line flags; None values are ignored.

    Raises:
        ValueError: an unknown key, a value of the wrong type, or an invalid setting (the
            message names the field).
    """
    values: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    if file is not None:
        data = tomllib.loads(file.read_text())
        scheduler.update(data.pop("scheduler", {}))
        values.update(data)
    values.update(_from_env(env or {}))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(Config)} - {"scheduler"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}; known: {sorted(known)}")
    return Config(
        **{name: _coerce(name, value) for name, value in values.items()},
        scheduler=_scheduler_config(scheduler),
    )


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None and f.name != "scheduler":
            values[f.name] = raw
    if "otlp_endpoint" not in values and env.get(OTEL_ENDPOINT_ENV):
        values["otlp_endpoint"] = env[OTEL_ENDPOINT_ENV]
    return values


_BOOL_TEXT = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _coerce(name: str, value: Any) -> Any:
    """Turn text from the environment (or TOML values) into the field's type."""
    default = next(f for f in dataclasses.fields(Config) if f.name == name)
    kind = default.type if isinstance(default.type, str) else str(default.type)
    if not isinstance(value, str) or kind == "str":
        if kind.startswith("int") and isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return TextTokenizer(value) if name == "text_tokenizer" else value
    try:
        if kind == "bool":
            return _BOOL_TEXT[value.strip().lower()]
        if kind.startswith("int"):
            return int(value)
        if kind == "float":
            return float(value)
        if name == "text_tokenizer":
            return TextTokenizer(value)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{name}: cannot use {value!r} ({kind})") from exc
    return value


def _scheduler_config(values: Mapping[str, Any]) -> SchedulerConfig:
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown [scheduler] keys: {unknown}; known: {sorted(known)}")
    converted: dict[str, Any] = {
        name: _SCHEDULER_ENUMS[name](value) if name in _SCHEDULER_ENUMS else value
        for name, value in values.items()
    }
    return SchedulerConfig(**converted)
