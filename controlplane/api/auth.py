"""API-key authentication: every Inference and Cluster method puts the caller's `Principal` in
context before it runs (`add_authenticated` wraps the methods when they are registered).

Keys travel as `authorization: Bearer <key>` metadata (keys from `pecsched keys create`).
Missing, malformed, unknown or revoked keys get UNAUTHENTICATED. Client keys act for their
own tenant; admin keys act for every tenant and alone may Watch the cluster and Attach agents
(`require_admin` / `require_tenant` raise PERMISSION_DENIED). Health checks and reflection
need no key. With authentication disabled (`--no-auth`, local development only) every caller
is an admin of tenant "default". The wrapping also makes request deserialization lenient
(`limits.lenient`): malformed bytes reach the handler as `Undecodable`, which the recipe refuses
with INVALID_ARGUMENT. Verified keys are cached for `cache_ttl_s` (revocation takes
effect within that time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane.api.errors import ApiError, ApiErrorCode, abort_with
from controlplane.api.limits import lenient
from controlplane.store.errors import StoreError
from controlplane.store.records import ApiKeyRole
from controlplane.store.repository import Repository

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling."""

    tenant: str  # the key's tenant
    is_admin: bool  # admin keys may act for every tenant
    key_id: str  # public key id ("" without authentication)


_ANONYMOUS_ADMIN = Principal(DEFAULT_TENANT, True, "")
_current: ContextVar[Principal | None] = ContextVar("pecsched-principal", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being served (set by `add_authenticated`'s wrapping)."""
    principal = _current.get()
    assert principal is not None, "RPC served without add_authenticated"
    return principal


def require_admin(principal: Principal, what: str) -> None:
    """PERMISSION_DENIED unless the caller holds an admin key."""
    if not principal.is_admin:
        raise ApiError(ApiErrorCode.PERMISSION_DENIED, f"{what} needs an admin API key")


def require_tenant(principal: Principal, tenant: str) -> None:
    """PERMISSION_DENIED when a client key acts for another tenant (the message names none)."""
    if not may_see(principal, tenant):
        raise ApiError(
            ApiErrorCode.PERMISSION_DENIED,
            "this API key may act only for its own tenant",
            field="tenant",
        )


def may_see(principal: Principal, tenant: str) -> bool:
    """Whether the caller may see and act on requests of `tenant`."""
    return principal.is_admin or tenant == principal.tenant


class Authenticator:
    """Checks bearer keys against the repository, with a small TTL cache."""

    def __init__(
        self, repo: Repository | None, executor: Executor | None, cache_ttl_s: float = 30.0
    ) -> None:
        self._repo = repo  # None: authentication disabled
        self._executor = executor
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}

    @property
    def enabled(self) -> bool:
        """False when every caller is an anonymous admin."""
        return self._repo is not None

    async def authenticate(self, metadata: Any) -> Principal:
        """The principal of the `authorization` metadata entry.

        Raises:
            ApiError: UNAUTHENTICATED for a missing, malformed, unknown or revoked key.
        """
        if self._repo is None:
            return _ANONYMOUS_ADMIN
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                ApiErrorCode.UNAUTHENTICATED,
                "missing API key: send metadata 'authorization: Bearer <key>'",
            )
        key = key.strip()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        repo = self._repo
        record = await asyncio.get_running_loop().run_in_executor(
            self._executor, repo.verify_api_key, key
        )
        if record is None:
            raise ApiError(ApiErrorCode.UNAUTHENTICATED, "unknown or revoked API key")
        principal = Principal(record.tenant, record.role is ApiKeyRole.ADMIN, record.key_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + self._ttl_s, principal)
        return principal


def add_authenticated(
    add_servicer: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    authenticator: Authenticator,
) -> None:
    """Register `servicer` on `server` through its generated `add_*Servicer_to_server`, every
    method wrapped to authenticate first (see the module docstring).

    The wrapping happens once, at registration, not per call (a server interceptor would
    run for every call, and costs more than the rest of a Submit's Python together).

    Raises:
        RuntimeError: the generated code registered no method by name (a grpc upgrade changed
            how it registers; the wrapping must follow).
    """
    registrar = _Registrar(server, authenticator)
    add_servicer(servicer, registrar)
    if not registrar.services:
        raise RuntimeError(f"{add_servicer.__name__} registered no methods by name")


class _Registrar:
    """Stands in for the server in a generated `add_*Servicer_to_server`."""

    def __init__(self, server: grpc.aio.Server, authenticator: Authenticator) -> None:
        self._server = server
        self._auth = authenticator
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        """Ignored: the same methods arrive by name in `add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Register `service`'s methods, wrapped, both by name and as a generic handler."""
        wrapped = {
            name: _authenticating(self._auth, handler, f"{name} request")
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)
        self.services.append(service)


def _authenticating(auth: Authenticator, handler: Any, what: str) -> Any:
    """`handler` authenticating before it runs, with a lenient request deserializer."""
    deserialize = lenient(handler.request_deserializer, what)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await _enter(auth, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, deserialize, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(auth, handler.unary_stream), deserialize, handler.response_serializer
        )
    assert handler.stream_stream is not None, "no client-streaming-only methods are served"
    return grpc.stream_stream_rpc_method_handler(
        _streaming(auth, handler.stream_stream), deserialize, handler.response_serializer
    )


def _streaming(auth: Authenticator, inner: Any) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """A server-streaming method (`inner`: unary-stream or stream-stream, its first argument
    the request or the request iterator) authenticating before it runs."""

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        await _enter(auth, context)
        async for item in inner(request, context):
            yield item

    return streaming


async def _enter(auth: Authenticator, context: Any) -> None:
    """Authenticate and set the principal for the rest of this RPC's task.

    Each RPC runs in its own asyncio task (a copy of the context), so the value never leaks
    into other calls and is not reset (an async generator may be finalized in another context).
    """
    try:
        principal = await auth.authenticate(context.invocation_metadata())
    except (ApiError, StoreError) as exc:  # StoreError: the key table is unreachable
        await abort_with(context, exc)
    _current.set(principal)
