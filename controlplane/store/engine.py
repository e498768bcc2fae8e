"""Engine factory: one place that knows how each dialect must be configured.

SQLite (the embedded default, `sqlite:///pecsched.db`): WAL journal, `synchronous=FULL` (a
committed transaction survives a crash of the process and of the machine), foreign keys on,
a busy timeout, and transactions begun explicitly by SQLAlchemy (so DDL is transactional and
write transactions take the write lock up front with `BEGIN IMMEDIATE`).
PostgreSQL (`postgresql+psycopg://user@host/db`): psycopg 3, which prepares statements that
run repeatedly on the server by itself; pass `?options=-csearch_path%3Dmyschema` in the URL to
use a schema other than `public`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

DEFAULT_DB_URL = "sqlite:///pecsched.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000

# Execution option read by the BEGIN hook: "IMMEDIATE" takes SQLite's write lock at BEGIN, so
# a write transaction never fails later with SQLITE_BUSY when upgrading a read lock.
SQLITE_BEGIN_OPTION = "pecsched_sqlite_begin"


def make_engine(
    url: str | URL = DEFAULT_DB_URL,
    *,
    echo: bool = False,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> Engine:
    """An Engine for `url` with the settings of its dialect applied.

    Args:
        url: `sqlite:///path.db`, `sqlite://` (in memory, one shared connection) or
            `postgresql+psycopg://user[:password]@host[:port]/database[?options=...]`.
        echo: log every statement (debugging).
        sqlite_busy_timeout_ms: how long a SQLite statement waits for another process's lock
            before it fails (and the runtime rebuilds once the lock is gone).

    Returns:
        The Engine; it opens no connection until first used.

    Raises:
        ValueError: for a dialect other than sqlite or postgresql.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, echo=echo, busy_timeout_ms=sqlite_busy_timeout_ms)
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(f"db url: use the psycopg driver, postgresql+psycopg://...; got {url}")
        return create_engine(parsed, echo=echo, pool_pre_ping=True, pool_size=8, max_overflow=8)
    raise ValueError(
        f"db url: unsupported database {backend!r}; use sqlite:///FILE or postgresql+psycopg://..."
    )


def _sqlite_engine(url: URL, *, echo: bool, busy_timeout_ms: int) -> Engine:
    """SQLite with WAL, FULL sync, foreign keys, busy timeout and explicit BEGIN."""
    in_memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
    }
    if in_memory:
        # Every connection to ":memory:" would be a different, empty database: share one.
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions skip DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine
