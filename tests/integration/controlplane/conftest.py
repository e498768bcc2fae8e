"""Fixtures of the control-plane integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cp_harness import migrated_db
from integration.store.postgres import fresh_schema_url

from controlplane.store import migrate
from controlplane.store.engine import make_engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database at the head revision: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield migrated_db(tmp_path)
        return
    with fresh_schema_url() as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
