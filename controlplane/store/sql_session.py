"""The SQL unit of work: a re-entrant transaction scope and the one DB-error translation.

`SqlUnitOfWork.scope(write=...)` yields the Connection of the transaction open in this context
(asyncio task or thread), or opens one that commits when the outermost scope exits without an
exception and rolls back otherwise. Helpers run statements on the yielded connection; they
never commit. Every DB-API error raised inside a scope leaves it as a `StoreError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from controlplane.store.engine import SQLITE_BEGIN_OPTION
from controlplane.store.errors import AlreadyExists, Conflict, NotFound, StoreError, Unavailable
from controlplane.store.repository import ReadOnlyTransactionError

# PostgreSQL SQLSTATEs and SQLite extended result names of integrity failures.
_PG_UNIQUE, _PG_FOREIGN_KEY = "23505", "23503"
_SQLITE_UNIQUE = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}
_SQLITE_FOREIGN_KEY = "SQLITE_CONSTRAINT_FOREIGNKEY"


_WRITE_VERBS = {"INSERT", "UPDATE", "DELETE"}


@dataclass(slots=True)
class _Open:
    connection: Connection
    write: bool


class SqlUnitOfWork:
    """Re-entrant transactions on one Engine, tracked per execution context."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._is_sqlite = engine.dialect.name == "sqlite"
        self._current: ContextVar[_Open | None] = ContextVar(f"uow-{id(self)}", default=None)
        event.listen(engine, "before_cursor_execute", self._refuse_writes_when_read_only)

    def _refuse_writes_when_read_only(
        self, connection: Connection, _cursor: Any, statement: str, *_args: Any
    ) -> None:
        """Second line of defence: a write statement on a read-only scope's connection fails."""
        current = self._current.get()
        if current is None or current.write or current.connection is not connection:
            return
        if statement.lstrip()[:6].upper() in _WRITE_VERBS:
            raise ReadOnlyTransactionError(f"write in a read-only transaction: {statement[:60]}")

    @contextmanager
    def scope(self, *, write: bool) -> Iterator[Connection]:
        """Join the open transaction or begin one; see the module docstring.

        Raises:
            ReadOnlyTransactionError: `write` inside a read-only transaction.
            StoreError: the translation of any database error inside the scope.
        """
        current = self._current.get()
        if current is not None:
            if write and not current.write:
                raise ReadOnlyTransactionError("write inside a read-only transaction")
            try:
                yield current.connection
            except DBAPIError as exc:
                raise translate_db_error(exc) from exc
            return
        try:
            with self.engine.connect() as connection:
                if write and self._is_sqlite:
                    connection.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                with connection.begin():
                    token = self._current.set(_Open(connection, write))
                    try:
                        yield connection
                    finally:
                        self._current.reset(token)
        except DBAPIError as exc:
            raise translate_db_error(exc) from exc


def copy_rows(
    connection: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Append `rows` to `table` by PostgreSQL's COPY, inside the connection's transaction."""
    if not rows:
        return
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    with _driver(connection, statement) as driver:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)


def fetch_binary(connection: Connection, statement: str) -> list[tuple[Any, ...]]:
    """Every row of a PostgreSQL query (no parameters), received in the binary format (blobs
    are not hex-encoded on the way)."""
    with _driver(connection, statement) as driver:
        with driver.cursor(binary=True) as cursor:
            cursor.execute(statement)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows


@contextmanager
def _driver(connection: Connection, statement: str) -> Iterator[Any]:
    """psycopg's connection under `connection`, inside its transaction. A driver error leaves
    as SQLAlchemy's DBAPIError (as from any statement), so the scope translates it."""
    driver: Any = connection.connection.dbapi_connection
    assert driver is not None, "a connection inside a transaction is open"
    try:
        yield driver
    except Exception as exc:
        dbapi = connection.dialect.loaded_dbapi
        if not isinstance(exc, dbapi.Error):
            raise
        raise DBAPIError.instance(
            statement,
            None,
            exc,
            dbapi.Error,
            connection_invalidated=connection.dialect.is_disconnect(exc, driver, None),
            dialect=connection.dialect,
        ) from exc


def translate_db_error(exc: DBAPIError) -> StoreError:
    """The store error for a DB-API error (the only place that inspects driver errors)."""
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    if isinstance(exc, IntegrityError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        sqlite_name = getattr(exc.orig, "sqlite_errorname", None)
        if sqlstate == _PG_UNIQUE or sqlite_name in _SQLITE_UNIQUE:
            return AlreadyExists(f"already exists: {detail}")
        if sqlstate == _PG_FOREIGN_KEY or sqlite_name == _SQLITE_FOREIGN_KEY:
            return NotFound(f"a referenced row does not exist: {detail}")
        return Conflict(f"constraint violated: {detail}")
    return Unavailable(f"database unavailable: {detail}")
