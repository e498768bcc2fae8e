"""Alembic environment: one tree for SQLite and PostgreSQL, generated from store.tables.

Programmatic callers (`controlplane.store.migrate`) pass an open connection in
`config.attributes["connection"]` and own its transaction. The plain `alembic` command builds
an engine from `-x db=URL` (else `sqlalchemy.url` of alembic.ini) through the store's engine
factory, so SQLite gets the same pragmas as the server.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from controlplane.store.engine import make_engine
from controlplane.store.migrate import migration_connection
from controlplane.store.tables import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("no database: pass -x db=URL")
    return url


def run_offline() -> None:
    """Emit the SQL of the migrations to stdout (`alembic ... upgrade head --sql`)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations on a connection: the caller's if given, else a fresh one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():  # joins the caller's transaction
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with migration_connection(engine) as own_connection:
            _configure(own_connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
