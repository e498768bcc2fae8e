"""The read-only role of docs/sql.md, created as documented, can read the views and nothing
else: not the tables, no writes, no objects of its own, even with its read-only default off."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from integration.store.postgres import unique_database
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from controlplane.store.engine import make_engine

pytestmark = pytest.mark.postgres

DOC = Path(__file__).resolve().parents[3] / "docs" / "sql.md"


def _role_block(database: str, suffix: str) -> list[str]:
    """The documented statements, for `database`, with role names unique to this test."""
    block = re.search(r"## A read-only role on PostgreSQL.*?```sql postgresql\n(.*?)```",
                      DOC.read_text(), flags=re.DOTALL)  # fmt: skip
    assert block is not None
    sql = (
        block.group(1)
        .replace("DATABASE pecsched", f'DATABASE "{database}"')
        .replace("pecsched_readonly", f"pecsched_readonly_{suffix}")
        .replace("analyst", f"analyst_{suffix}")
    )
    return [s for s in sql.split(";") if s.strip()]


def test_the_documented_read_only_role_reads_views_and_nothing_else():
    with unique_database() as url:
        # Prepare
        database = make_url(url).database
        suffix = secrets.token_hex(4)
        owner = make_engine(url)
        with owner.begin() as connection:
            for statement in _role_block(database, suffix):
                connection.execute(text(statement))
        analyst = make_engine(make_url(url).set(username=f"analyst_{suffix}")).execution_options(
            isolation_level="AUTOCOMMIT"  # each statement its own transaction, after each SET
        )
        attempts = {
            "lift default and create a temp table": (
                "SET default_transaction_read_only = off; CREATE TEMP TABLE t (x int)"
            ),
            "create a table": "SET default_transaction_read_only = off; CREATE TABLE t (x int)",
            "read the prompts": "SELECT prompt_token_ids FROM requests",
            "write a request": (
                "SET default_transaction_read_only = off; UPDATE requests SET state = 'failed'"
            ),
            "read the key hashes": "SELECT key_sha256 FROM api_keys",
        }
        refused: dict[str, bool] = {}
        try:
            # Execute
            with analyst.connect() as connection:
                rows = connection.execute(text("SELECT count(*) FROM request_history")).scalar()
            for what, sql in attempts.items():
                with analyst.connect() as connection:
                    try:
                        for statement in sql.split("; "):
                            connection.execute(text(statement))
                        refused[what] = False
                    except ProgrammingError as exc:
                        refused[what] = "permission denied" in str(exc.orig)
        finally:
            analyst.dispose()
            with owner.begin() as connection:
                connection.execute(
                    text(f"DROP OWNED BY pecsched_readonly_{suffix}, analyst_{suffix}")
                )
                connection.execute(text(f"DROP ROLE analyst_{suffix}"))
                connection.execute(text(f"DROP ROLE pecsched_readonly_{suffix}"))
            owner.dispose()
        # Assert
        assert rows == 0
        assert refused == dict.fromkeys(attempts, True)
