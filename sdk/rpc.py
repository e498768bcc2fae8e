"""gRPC glue shared by the sync and asyncio clients: settings, call metadata, TLS credentials
and the translation of gRPC errors into `sdk.errors`. RPCs go through the generated
`inference_pb2_grpc.InferenceStub`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from sdk.errors import PecSchedError, error_from_status
from sdk.retry import RetryPolicy

# A W3C trace-context `traceparent` header: version-traceid-parentid-flags, lower-case hex.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

# Channel arguments the SDK sets unless the caller overrides them: reconnect within a second of
# the control plane coming back (grpc's default backoff grows to minutes), so retries and stream
# resumption ride out a restart.
DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

# Supplies the traceparent of the caller's current span, or None when there is none.
TraceparentSource = str | Callable[[], str | None] | None


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a client reaches and authenticates with the control plane."""

    target: str  # host:port of the control plane's gRPC API
    api_key: str | None = None  # sent as `authorization: Bearer <key>`
    tls: bool = False  # use TLS (implied by root_certificates)
    root_certificates: bytes | None = None  # PEM roots to verify the server; None = system roots
    traceparent: TraceparentSource = None  # W3C traceparent, or a callable read on every call
    timeout_s: float | None = 30.0  # default deadline of unary calls (retries included)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    channel_options: tuple[tuple[str, Any], ...] = ()  # grpc channel arguments, over the defaults
    seed: int | None = None  # seeds the backoff jitter (None: nondeterministic)

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must not be empty (host:port)")
        if self.api_key is not None and (
            not self.api_key or any(c.isspace() for c in self.api_key)
        ):
            raise ValueError("api_key must be non-empty and contain no whitespace")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if isinstance(self.traceparent, str):
            check_traceparent(self.traceparent)

    @property
    def uses_tls(self) -> bool:
        """True when the channel is encrypted."""
        return self.tls or self.root_certificates is not None

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel arguments: `DEFAULT_CHANNEL_OPTIONS` updated with `channel_options`."""
        return list({**DEFAULT_CHANNEL_OPTIONS, **dict(self.channel_options)}.items())

    def make_rng(self) -> random.Random:
        """The jitter generator for one client."""
        return random.Random(self.seed)


def check_traceparent(value: str) -> str:
    """`value` if it is a well-formed W3C traceparent; ValueError naming it otherwise."""
    if not _TRACEPARENT.match(value):
        raise ValueError(f"traceparent must look like 00-<32 hex>-<16 hex>-<2 hex>, got {value!r}")
    return value


def call_metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the API key and the caller's trace context."""
    metadata: list[tuple[str, str]] = []
    if settings.api_key is not None:
        metadata.append(("authorization", f"Bearer {settings.api_key}"))
    source = settings.traceparent
    traceparent = source() if callable(source) else source
    if traceparent is not None:
        metadata.append(("traceparent", check_traceparent(traceparent)))
    return tuple(metadata)


def channel_credentials(settings: ClientSettings) -> Any:
    """grpc.ChannelCredentials for a TLS channel, None for plaintext."""
    if not settings.uses_tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=settings.root_certificates)


def _metadata_pairs(metadata: Any) -> Sequence[tuple[str, str | bytes]]:
    if metadata is None:
        return ()
    return [(str(key), value) for key, value in metadata]


def error_from_rpc(exc: grpc.RpcError) -> PecSchedError:
    """The typed SDK error of a sync or grpc.aio RpcError."""
    code = exc.code()
    status = code.name if code is not None else "UNKNOWN"
    details = exc.details() or ""
    return error_from_status(status, str(details), _metadata_pairs(exc.trailing_metadata()))
