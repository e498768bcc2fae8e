"""The repository contract on memory, SQLite in memory (create_all) and SQLite files migrated
with Alembic (the real upgrade path)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from repository_contract import RepositoryContract
from sqlalchemy import Engine

from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.memory import InMemoryRepository
from controlplane.store.repository import Repository
from controlplane.store.sql_repository import SqlRepository
from controlplane.store.tables import metadata


class TestInMemoryRepository(RepositoryContract):
    def repo_factory(self) -> Repository:
        return InMemoryRepository()


class TestSqliteMemoryRepository(RepositoryContract):
    @pytest.fixture(autouse=True)
    def _engines(self) -> Iterator[None]:
        self.engines: list[Engine] = []
        yield
        for engine in self.engines:
            engine.dispose()

    def repo_factory(self) -> Repository:
        engine = make_engine("sqlite://")
        metadata.create_all(engine)
        self.engines.append(engine)
        return SqlRepository(engine)


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file upgraded to head once; each test copies it."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


class TestSqliteFileRepository(RepositoryContract):
    @pytest.fixture(autouse=True)
    def _database(self, migrated_template: Path, tmp_path: Path) -> Iterator[None]:
        self.path = tmp_path / "pecsched.db"
        shutil.copyfile(migrated_template, self.path)
        self.engines: list[Engine] = []
        yield
        for engine in self.engines:
            engine.dispose()

    def repo_factory(self) -> Repository:
        engine = make_engine(f"sqlite:///{self.path}")
        migrate.verify_schema(engine)
        self.engines.append(engine)
        return SqlRepository(engine)
