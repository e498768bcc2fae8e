"""The repository contract on PostgreSQL, in a schema migrated with Alembic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration.store.postgres import fresh_schema_url, truncate_all
from sqlalchemy import Engine
from unit.store.repository_contract import RepositoryContract

from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.repository import Repository
from controlplane.store.sql_repository import SqlRepository

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    with fresh_schema_url() as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        yield engine
        engine.dispose()


class TestPostgresRepository(RepositoryContract):
    @pytest.fixture(autouse=True)
    def _clean(self, pg_engine: Engine) -> None:
        truncate_all(pg_engine)
        self.engine = pg_engine

    def repo_factory(self) -> Repository:
        migrate.verify_schema(self.engine)
        return SqlRepository(self.engine)
