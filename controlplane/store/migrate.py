"""Schema migrations: upgrade, downgrade, current revision, and the start-up schema check.

The Alembic tree lives in `migrations/` at the repository root (one tree for all dialects).
Every function here runs the migration in ONE transaction it owns: on PostgreSQL and SQLite
DDL is transactional, so a failed upgrade leaves the database where it was.

Alembic is imported only by the functions that run or render migrations: the start-up check
(`verify_schema`) reads the version table and the revision ids of `migrations/versions`
itself, which keeps Alembic's import (0.2-0.4 s on the 2-core box) out of every start.
"""

from __future__ import annotations

import ast
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from controlplane.store.engine import SQLITE_BEGIN_OPTION
from controlplane.store.errors import SchemaOutdated
from controlplane.store.sql_session import translate_db_error

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic Config of `migrations/`, bound to `connection` when given."""
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The single head revision of the tree: the one no other revision names as its
    `down_revision` (the tree is tested to have exactly one, equal to Alembic's head)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name, value = node.targets[0].id, ast.literal_eval(node.value)
                if name == "revision":
                    revisions.add(value)
                elif name == "down_revision" and value is not None:
                    parents.update([value] if isinstance(value, str) else value)
    heads = revisions - parents
    assert len(heads) == 1, f"migrations/versions must have one head, has {sorted(heads)}"
    return heads.pop()


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in one write transaction, committed on success, for running migrations.

    On SQLite, foreign keys are switched off for the duration (batch migrations copy and drop
    tables, and a DROP with foreign keys on would fire ON DELETE CASCADE into child tables) and
    `PRAGMA foreign_key_check` must come back empty before the commit; renames run in legacy
    mode so the admin views that name a table do not block its batch copy.

    Raises:
        StoreError: the translation of a database error (Unavailable when unreachable).
    """
    try:
        with _migration_connection(engine) as connection:
            yield connection
    except DBAPIError as exc:
        raise translate_db_error(exc) from exc


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        is_sqlite = connection.dialect.name == "sqlite"
        if is_sqlite:
            connection.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            raw = connection.connection.driver_connection
            raw.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            # Renaming a table must not re-check views that name it (batch mode renames).
            raw.execute("PRAGMA legacy_alter_table=ON")  # type: ignore[union-attr]
        try:
            with connection.begin():
                yield connection
                if is_sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    assert not broken, f"migration left dangling foreign keys: {broken}"
        finally:
            if is_sqlite:
                raw.execute("PRAGMA legacy_alter_table=OFF")  # type: ignore[union-attr]
                raw.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database of `engine` up to `revision` (default: the head)."""
    from alembic import command

    with migration_connection(engine) as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database of `engine` down to `revision` ("base" drops everything)."""
    from alembic import command

    with migration_connection(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    except DBAPIError as exc:
        raise translate_db_error(exc) from exc
    assert len(rows) <= 1, f"the database has several migration heads: {rows}"
    return str(rows[0][0]) if rows else None


def upgrade_command(engine: Engine) -> str:
    """The shell command that brings this engine's database to the head."""
    url = engine.url.render_as_string(hide_password=True)
    return f"pecsched db upgrade --db '{url}'"


def _is_known(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def verify_schema(engine: Engine) -> None:
    """Refuse a database that is not at the head revision (the server calls this at start).

    Raises:
        SchemaOutdated: the database is empty, behind, or at a revision this code does not
            know (newer code wrote it); the message carries the command to run.
        Unavailable: the database cannot be reached.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        found = "has no PecSched schema"
    elif not _is_known(current):
        raise SchemaOutdated(
            f"the database is at revision {current}, which this control plane does not know "
            f"(head {head}): it was migrated by a newer version; run that version"
        )
    else:
        found = f"is at revision {current}"
    raise SchemaOutdated(
        f"the database {found}, this control plane needs revision {head}; "
        f"run `{upgrade_command(engine)}` first"
    )


def offline_sql(dialect_url: str = "postgresql+psycopg://", revision: str = "head") -> str:
    """The SQL that upgrading an empty database to `revision` runs, rendered without a server.

    `docs/schema.sql` is this text for PostgreSQL (checked by tests/migrations).
    """
    from alembic import command
    from alembic.config import Config

    buffer = io.StringIO()
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"), output_buffer=buffer)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", dialect_url)
    command.upgrade(config, revision, sql=True)
    return buffer.getvalue()
