"""SQLAlchemy 2 models of the control plane's state, all in one `metadata`.

Conventions (docs/sql.md documents them for operators):
- Times are float seconds since the Unix epoch on the control plane's clock (`*_s` columns);
  differences of them are durations in seconds on every dialect without date arithmetic.
- Enumerations are short lowercase strings guarded by CHECK constraints.
- Token id sequences are packed little-endian uint32 (`*_token_ids` blobs, 4 bytes a token).
- Generated tokens are stored in append-only chunks (`request_tokens`) so appending never
  rewrites what was stored before.

ORM rows never leave `controlplane/store`: repositories convert them into core types.
Alembic migrations (migrations/) are generated from this metadata and tested equal to it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are deterministic so migrations (SQLite batch mode included) can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

REQUEST_STATES = (
    "queued",
    "prefilling",
    "paused",
    "transferring_kv",
    "decoding",
    "finished",
    "cancelled",
    "failed",
)
TERMINAL_REQUEST_STATES = ("finished", "cancelled", "failed")
REQUEST_CLASSES = ("short", "long")
INSTANCE_ROLES = ("general", "short_decode", "long_reserved")
INSTANCE_STATES = ("up", "draining", "down")
NODE_STATES = ("up", "down")
API_KEY_ROLES = ("client", "admin")

# Event ids grow without bound: 64-bit on PostgreSQL, SQLite's INTEGER rowid (also 64-bit).
_EVENT_ID = BigInteger().with_variant(Integer(), "sqlite")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """A CHECK expression `column IN ('a', 'b')` (values are code constants, never input)."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


# Predicate of the partial index on unfinished requests; queries must repeat it verbatim (as
# literal SQL, not with bound parameters) for the planners to use the index.
UNFINISHED_PREDICATE = f"NOT ({_one_of('state', TERMINAL_REQUEST_STATES)})"
_UNFINISHED = text(UNFINISHED_PREDICATE)


class Base(DeclarativeBase):
    """Declarative base holding the single `metadata` of the control plane."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {}


class RequestRow(Base):
    """One inference request: what was asked, where it is, and when each milestone happened."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    request_class: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(24))
    # Prompt token ids, packed little-endian uint32.
    prompt_token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    # Sampling: temperature 0 = greedy; top_p 0 = disabled; seed stored as signed 64-bit.
    temperature: Mapped[float] = mapped_column(Double)
    top_p: Mapped[float] = mapped_column(Double)
    seed: Mapped[int] = mapped_column(BigInteger)
    stop_at_eos: Mapped[bool] = mapped_column(Boolean)
    priority: Mapped[int] = mapped_column(Integer)
    deadline_s: Mapped[float | None] = mapped_column(Double)
    # Client-chosen key making Submit idempotent; unique per tenant, NULL when not given.
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    output_tokens: Mapped[int] = mapped_column(Integer)
    # Why it FAILED or was CANCELLED; NULL otherwise.
    error: Mapped[str | None] = mapped_column(Text)
    num_preemptions: Mapped[int] = mapped_column(Integer)
    num_requeues: Mapped[int] = mapped_column(Integer)
    # Seconds spent PAUSED (completed pauses).
    paused_total_s: Mapped[float] = mapped_column(Double)
    # Instances it runs on now, comma-separated in rank order ('' when none).
    prefill_instance_ids: Mapped[str] = mapped_column(Text)
    decode_instance_ids: Mapped[str] = mapped_column(Text)
    # Prefill chunks finished / planned in the current attempt.
    chunks_done: Mapped[int] = mapped_column(Integer)
    chunks_total: Mapped[int] = mapped_column(Integer)
    arrival_s: Mapped[float] = mapped_column(Double)
    first_scheduled_s: Mapped[float | None] = mapped_column(Double)
    prefill_done_s: Mapped[float | None] = mapped_column(Double)
    first_token_s: Mapped[float | None] = mapped_column(Double)
    finished_s: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        CheckConstraint(_one_of("state", REQUEST_STATES), name="state"),
        CheckConstraint(_one_of("request_class", REQUEST_CLASSES), name="request_class"),
        CheckConstraint("prompt_tokens > 0 AND max_new_tokens > 0", name="token_counts"),
        # Listing per tenant by arrival, either direction (keyset pagination on (arrival_s, id);
        # the List RPC scans it backwards, newest first).
        Index(None, "tenant", "arrival_s", "id"),
        # Listing everything by arrival, either direction; time-window admin queries.
        Index(None, "arrival_s", "id"),
        # Watch counters by class and state.
        Index(None, "request_class", "state"),
        # Recovery after restart and the live queue: only unfinished rows are indexed.
        Index(
            "ix_requests_unfinished",
            "arrival_s",
            "id",
            sqlite_where=_UNFINISHED,
            postgresql_where=_UNFINISHED,
        ),
    )


class RequestTokensRow(Base):
    """A chunk of generated token ids of one request, starting at `start_index`."""

    __tablename__ = "request_tokens"

    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True
    )
    start_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Token ids, packed little-endian uint32.
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)


class RequestEventRow(Base):
    """One entry of a request's lifecycle timeline (queued, chunk done, paused, ... finished)."""

    __tablename__ = "request_events"

    id: Mapped[int] = mapped_column(_EVENT_ID, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    at_s: Mapped[float] = mapped_column(Double)
    instance_id: Mapped[str | None] = mapped_column(String(64))
    # Kind-specific detail: reason, chunk index, bytes, duration_s, error, ...
    details: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index(None, "request_id", "id"),)


class NodeRow(Base):
    """A machine running one agent."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16))
    registered_s: Mapped[float] = mapped_column(Double)
    last_heartbeat_s: Mapped[float] = mapped_column(Double)

    __table_args__ = (CheckConstraint(_one_of("state", NODE_STATES), name="state"),)


class InstanceRow(Base):
    """One model replica on `tp` devices of one node."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    tp: Mapped[int] = mapped_column(Integer)
    # Device (GPU) indices on the node, one per tensor-parallel rank, comma-separated.
    device_indices: Mapped[str] = mapped_column(String(256))
    kv_capacity_tokens: Mapped[int] = mapped_column(BigInteger)
    updated_s: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint(_one_of("role", INSTANCE_ROLES), name="role"),
        CheckConstraint(_one_of("state", INSTANCE_STATES), name="state"),
        CheckConstraint("tp > 0", name="tp"),
    )


class ApiKeyRow(Base):
    """An API key: only the SHA-256 of the (high-entropy) secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Hex SHA-256 of the whole key string the client sends.
    key_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(128))
    created_s: Mapped[float] = mapped_column(Double)
    revoked_s: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (CheckConstraint(_one_of("role", API_KEY_ROLES), name="role"),)


metadata = Base.metadata
