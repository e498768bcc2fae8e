"""SQLAlchemy Core tables of the control plane's state, all in one `metadata`.

Conventions (docs/sql.md documents them for operators):
- Times are float seconds since the Unix epoch on the control plane's clock (`*_s` columns);
  differences of them are durations in seconds on every dialect without date arithmetic.
- Enumerations are short lowercase strings guarded by CHECK constraints.
- Token id sequences are packed little-endian uint32 (`*_token_ids` blobs, 4 bytes a token).
- Generated tokens are stored in append-only chunks (`request_tokens`) so appending never
  rewrites what was stored before.

Rows never leave `controlplane/store`: repositories convert them into core types. The tables
are Core `Table`s: the ORM is never imported (it would add ~0.1 s to every start).
Alembic migrations (migrations/) are generated from this metadata and tested equal to it.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

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


metadata = MetaData(naming_convention=NAMING_CONVENTION)


# One inference request: what was asked, where it is, and when each milestone happened.
Table(
    "requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("request_class", String(16), nullable=False),
    Column("state", String(24), nullable=False),
    # Prompt token ids, packed little-endian uint32.
    Column("prompt_token_ids", LargeBinary, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("max_new_tokens", Integer, nullable=False),
    # Sampling: temperature 0 = greedy; top_p 0 = disabled; seed stored as signed 64-bit.
    Column("temperature", Double, nullable=False),
    Column("top_p", Double, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("stop_at_eos", Boolean, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("deadline_s", Double),
    # Client-chosen key making Submit idempotent; unique per tenant, NULL when not given.
    Column("idempotency_key", String(128)),
    Column("output_tokens", Integer, nullable=False),
    # Why it FAILED or was CANCELLED; NULL otherwise.
    Column("error", Text),
    Column("num_preemptions", Integer, nullable=False),
    Column("num_requeues", Integer, nullable=False),
    # Seconds spent PAUSED (completed pauses).
    Column("paused_total_s", Double, nullable=False),
    # Instances it runs on now, comma-separated in rank order ('' when none).
    Column("prefill_instance_ids", Text, nullable=False),
    Column("decode_instance_ids", Text, nullable=False),
    # Prefill chunks finished / planned in the current attempt.
    Column("chunks_done", Integer, nullable=False),
    Column("chunks_total", Integer, nullable=False),
    Column("arrival_s", Double, nullable=False),
    Column("first_scheduled_s", Double),
    Column("prefill_done_s", Double),
    Column("first_token_s", Double),
    Column("finished_s", Double),
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


# A chunk of generated token ids of one request, starting at `start_index`.
Table(
    "request_tokens",
    metadata,
    Column("request_id", ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True),
    Column("start_index", Integer, primary_key=True),
    # Token ids, packed little-endian uint32.
    Column("token_ids", LargeBinary, nullable=False),
)


# One entry of a request's lifecycle timeline (queued, chunk done, paused, ... finished).
Table(
    "request_events",
    metadata,
    Column("id", _EVENT_ID, primary_key=True, autoincrement=True),
    Column("request_id", ForeignKey("requests.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("at_s", Double, nullable=False),
    Column("instance_id", String(64)),
    # Kind-specific detail: reason, chunk index, bytes, duration_s, error, ...
    Column("details", JSON, nullable=False),
    Index(None, "request_id", "id"),
)


# A machine running one agent.
Table(
    "nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("address", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("registered_s", Double, nullable=False),
    Column("last_heartbeat_s", Double, nullable=False),
    CheckConstraint(_one_of("state", NODE_STATES), name="state"),
)


# One model replica on `tp` devices of one node.
Table(
    "instances",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("node_id", ForeignKey("nodes.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("role", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("tp", Integer, nullable=False),
    # Device (GPU) indices on the node, one per tensor-parallel rank, comma-separated.
    Column("device_indices", String(256), nullable=False),
    Column("kv_capacity_tokens", BigInteger, nullable=False),
    Column("updated_s", Double, nullable=False),
    CheckConstraint(_one_of("role", INSTANCE_ROLES), name="role"),
    CheckConstraint(_one_of("state", INSTANCE_STATES), name="state"),
    CheckConstraint("tp > 0", name="tp"),
)


# An API key: only the SHA-256 of the (high-entropy) secret is stored.
Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    # Hex SHA-256 of the whole key string the client sends.
    Column("key_sha256", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("created_s", Double, nullable=False),
    Column("revoked_s", Double),
    CheckConstraint(_one_of("role", API_KEY_ROLES), name="role"),
)
