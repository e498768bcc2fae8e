"""Every SQL block of docs/sql.md runs on a migrated database with rows, on its dialects."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.store.postgres import fresh_schema_url
from sqlalchemy import Engine, text
from unit.store.repository_contract import make_new_request, running

from controlplane.core.types import RequestClass, RequestState
from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.records import RequestEvent, RequestEventKind
from controlplane.store.sql_repository import SqlRepository

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
BLOCKS = re.findall(r"```sql( \w+)?\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def populated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Engine]]:
    """A migrated database of each dialect with recent short and long requests."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("docs") / "p.db"
        engine = make_engine(f"sqlite:///{path}")
        yield from _populate("sqlite", engine)
        return
    with fresh_schema_url() as url:
        yield from _populate("postgresql", make_engine(url))


def _populate(dialect: str, engine: Engine) -> Iterator[tuple[str, Engine]]:
    migrate.upgrade(engine)
    repo = SqlRepository(engine)
    now = time.time()
    with repo.transaction(write=True):
        _add_requests(repo, now)
    yield dialect, engine
    engine.dispose()


def _add_requests(repo: SqlRepository, now: float) -> None:
    news = [
        make_new_request(
            f"req-{i}",
            tenant=f"t{i % 3}",
            arrival_s=now - 600 + i,
            request_class=RequestClass.LONG if i % 10 == 0 else RequestClass.SHORT,
        )
        for i in range(200)
    ]
    views = [result.view for result in repo.add_requests(news)]
    finished = []
    for i, view in enumerate(views):
        scheduled = view.spec.arrival_s + (i % 100) / 100
        finished.append(
            running(
                view,
                state=RequestState.FINISHED,
                first_scheduled_s=scheduled,
                first_token_s=scheduled + 0.1,
                finished_s=scheduled + 1.0,
                output_tokens=4,
                num_preemptions=5 if view.request_class is RequestClass.LONG else 0,
            )
        )
    repo.update_requests(finished)
    repo.record_events([RequestEvent(v.request_id, RequestEventKind.QUEUED, now) for v in views])


def test_the_doc_has_the_promised_queries() -> None:
    tags = [tag.strip() for tag, _ in BLOCKS]
    assert tags.count("postgresql") >= 2 and tags.count("sqlite") == 1
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_sql_block_runs(populated: tuple[str, Engine], index: int) -> None:
    dialect, engine = populated
    tag, sql = BLOCKS[index]
    if tag.strip() and tag.strip() != dialect:
        pytest.skip(f"block {index} is for {tag.strip()}")
    statements = [s for s in sql.split(";") if s.strip()]

    with engine.connect() as connection:
        transaction = connection.begin()
        if dialect == "postgresql":
            schema = connection.execute(text("SELECT current_schema()")).scalar()
            database = connection.execute(text("SELECT current_database()")).scalar()
            statements = [
                s.replace("SCHEMA public", f'SCHEMA "{schema}"').replace(
                    "DATABASE pecsched", f'DATABASE "{database}"'
                )
                for s in statements
            ]
        executed = [connection.execute(text(s)) for s in statements]
        results = [r.all() if r.returns_rows else [] for r in executed]
        transaction.rollback()  # roles created by the examples are not kept

    if "p99_queueing_delay_s" in sql:
        # Short delays are (i % 100) / 100 s for i not divisible by 10: p99 is 0.99 s.
        assert results[0][0][0] == pytest.approx(0.99, abs=0.011)
    if "long_tokens" in sql:
        assert sum(row[2] for row in results[0]) == 20
    if "preemptions > 3" in sql:
        assert len(results[0]) == 20
