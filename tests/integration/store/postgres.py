"""PostgreSQL for tests: a fresh schema per test run at 127.0.0.1:5432/test, dropped after, or
a whole database of its own (when a test kills sessions or changes database-wide settings).

Unreachable server: the test is skipped, except under CI=true where it fails (CI must run it).
`PECSCHED_TEST_POSTGRES_URL` overrides the server URL (default user postgres, trust auth).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from controlplane.store import migrate
from controlplane.store.engine import make_engine

SERVER_URL = os.environ.get(
    "PECSCHED_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _unreachable(reason: str) -> None:
    message = f"PostgreSQL at {SERVER_URL} unreachable: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the postgres tests must run)")
    pytest.skip(message)


@contextmanager
def fresh_schema_url() -> Iterator[str]:
    """A URL whose search_path is a new empty schema; the schema is dropped on exit."""
    admin = make_engine(make_url(SERVER_URL).update_query_dict({"connect_timeout": "3"}))
    schema = f"pecsched_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        _unreachable(str(exc.orig).strip().splitlines()[0])
    try:
        url = make_url(SERVER_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def truncate_all(engine: Engine) -> None:
    """Empty every table of the schema (fast reset between tests)."""
    with engine.begin() as connection:
        connection.execute(
            text("TRUNCATE requests, request_tokens, request_events, nodes, instances, api_keys")
        )


@contextmanager
def unique_database() -> Iterator[str]:
    """A new database at the head revision, named for this process and test; dropped on exit
    (its own name lets a test kill its sessions or change its settings, and only its)."""
    name = f"pecsched_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = make_engine(make_url(SERVER_URL).update_query_dict({"connect_timeout": "3"}))
    admin = admin.execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        _unreachable(str(exc.orig).strip().splitlines()[0])
    url = make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
