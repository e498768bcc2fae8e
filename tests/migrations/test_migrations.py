"""Migrations: one head, upgrade == metadata, round trips with rows, the admin views, the
schema snapshot and the start-up schema check, on SQLite and PostgreSQL."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from integration.store.postgres import fresh_schema_url
from sqlalchemy import Engine, text
from unit.store.repository_contract import make_instance, make_new_request, make_node, running

from controlplane.core.types import RequestClass, RequestState
from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.errors import SchemaOutdated
from controlplane.store.records import (
    ApiKeyRole,
    RequestEvent,
    RequestEventKind,
    RequestFilter,
)
from controlplane.store.schema_snapshot import render_schema_snapshot
from controlplane.store.sql_repository import SqlRepository
from controlplane.store.tables import metadata

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ScriptDirectory.from_config(migrate.alembic_config())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database of each dialect."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'pecsched.db'}")
        yield engine
        engine.dispose()
        return
    with fresh_schema_url() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def _fill(repo: SqlRepository) -> None:
    """One of every kind of row."""
    with repo.transaction(write=True):
        view = repo.add_request(make_new_request("r1", key="k1")).view
        repo.update_requests([running(view, state=RequestState.DECODING, first_scheduled_s=101.0)])
        repo.append_output_tokens("r1", 0, [4, 5])
        repo.record_events([RequestEvent("r1", RequestEventKind.QUEUED, 100.0, None, {"a": 1})])
        repo.upsert_node(make_node())
        repo.upsert_instance(make_instance("i-1"))
        repo.create_api_key(ApiKeyRole.CLIENT, "acme", 1.0)


def test_exactly_one_head() -> None:
    assert len(SCRIPTS.get_heads()) == 1
    # The start-up check reads the head without Alembic: it must find Alembic's.
    assert migrate.head_revision() == SCRIPTS.get_current_head()


def test_every_revision_is_dated_documented_and_reversible() -> None:
    notes = (REPO / "migrations" / "NOTES.md").read_text()
    revisions = list(SCRIPTS.walk_revisions())
    assert revisions
    for script in revisions:
        path = Path(script.path)
        assert re.fullmatch(
            rf"\d{{4}}_\d{{2}}_\d{{2}}_\d{{4}}_{script.revision}_\w+\.py", path.name
        )
        module = ast.parse(path.read_text())
        docstring = ast.get_docstring(module)
        assert docstring and "\n" not in docstring, f"{path.name}: needs a one-line docstring"
        downgrade = next(
            node
            for node in module.body
            if isinstance(node, ast.FunctionDef) and node.name == "downgrade"
        )
        statements = [
            node
            for node in downgrade.body
            if not isinstance(node, ast.Pass)
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        assert statements, f"{path.name}: downgrade() does nothing"
        assert f"`{script.revision}`" in notes, f"NOTES.md has no entry for {script.revision}"


def test_upgrade_from_empty_equals_the_metadata(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)

    assert _schema_diff(empty_engine) == []
    assert migrate.current_revision(empty_engine) == migrate.head_revision()


def test_downgrade_upgrade_round_trip_with_rows(empty_engine: Engine) -> None:
    # Prepare
    migrate.upgrade(empty_engine)
    repo = SqlRepository(empty_engine)
    _fill(repo)
    revisions = [s.revision for s in SCRIPTS.walk_revisions()]  # head first
    # Execute: step down one revision at a time while rows survive, then to base and back.
    for revision in revisions[1:]:
        migrate.downgrade(empty_engine, revision)
        assert migrate.current_revision(empty_engine) == revision
        with empty_engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM requests")).scalar() == 1
    migrate.upgrade(empty_engine)
    assert repo.get_output_tokens("r1") == (4, 5)
    migrate.downgrade(empty_engine, "base")
    assert migrate.current_revision(empty_engine) is None
    migrate.upgrade(empty_engine)
    # Assert
    assert _schema_diff(empty_engine) == []
    _fill(repo)
    assert [v.request_id for v in repo.list_requests(RequestFilter()).views] == ["r1"]


def test_request_history_derives_the_metrics(empty_engine: Engine) -> None:
    # Prepare: arrival 100, scheduled 100.5, prefill done 101.5, first token 101.5,
    # finished 103.5 after 5 tokens, preempted twice, ran on i-2 then i-1.
    migrate.upgrade(empty_engine)
    repo = SqlRepository(empty_engine)
    view = repo.add_request(make_new_request("r1", request_class=RequestClass.LONG)).view
    finished = running(
        view,
        state=RequestState.FINISHED,
        first_scheduled_s=100.5,
        prefill_done_s=101.5,
        first_token_s=101.5,
        finished_s=103.5,
        output_tokens=5,
        num_preemptions=2,
        paused_total_s=0.25,
    )
    repo.update_requests([finished])
    repo.record_events(
        [
            RequestEvent("r1", RequestEventKind.QUEUED, 100.0),
            RequestEvent("r1", RequestEventKind.PREFILL_STARTED, 100.5, "i-2"),
            RequestEvent("r1", RequestEventKind.DECODE_STARTED, 101.5, "i-1"),
            RequestEvent("r1", RequestEventKind.FINISHED, 103.5, "i-1"),
        ]
    )
    # Execute
    with empty_engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM request_history")).one()._mapping
        timeline = connection.execute(
            text("SELECT kind, since_arrival_s FROM request_timeline ORDER BY event_id")
        ).all()
    # Assert
    assert (row["request_id"], row["tenant"], row["request_class"], row["state"]) == (
        "r1",
        "acme",
        "long",
        "finished",
    )
    assert (row["prompt_tokens"], row["output_tokens"], row["preemptions"]) == (3, 5, 2)
    assert row["queueing_delay_s"] == pytest.approx(0.5)
    assert row["prefill_s"] == pytest.approx(1.0)
    assert row["ttft_s"] == pytest.approx(1.5)
    assert row["jct_s"] == pytest.approx(3.5)
    assert row["mean_tbt_s"] == pytest.approx(0.5)
    assert row["instances"] == "i-1,i-2"
    arrival_at = row["arrival_at"]  # timestamptz on PostgreSQL, UTC text on SQLite
    if isinstance(arrival_at, datetime):
        assert arrival_at.timestamp() == pytest.approx(100.0)
    else:
        assert arrival_at == "1970-01-01 00:01:40.000"
    assert [(kind, pytest.approx(s)) for kind, s in timeline] == [
        ("queued", 0.0),
        ("prefill_started", 0.5),
        ("decode_started", 1.5),
        ("finished", 3.5),
    ]


def test_verify_schema_names_the_command_to_run(empty_engine: Engine) -> None:
    with pytest.raises(SchemaOutdated, match="pecsched db upgrade --db") as empty:
        migrate.verify_schema(empty_engine)
    assert "no PecSched schema" in str(empty.value)

    first = list(SCRIPTS.walk_revisions())[-1].revision
    migrate.upgrade(empty_engine, first)
    if first != migrate.head_revision():
        with pytest.raises(SchemaOutdated, match=f"revision {first}.*pecsched db upgrade"):
            migrate.verify_schema(empty_engine)

    migrate.upgrade(empty_engine)
    migrate.verify_schema(empty_engine)
    with empty_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'fromthefuture'"))
    with pytest.raises(SchemaOutdated, match="newer version"):
        migrate.verify_schema(empty_engine)


def test_schema_snapshot_is_current() -> None:
    committed = (REPO / "docs" / "schema.sql").read_text()

    assert committed == render_schema_snapshot(), (
        "docs/schema.sql is stale. HOW TO FIX: "
        ".venv/bin/python -m controlplane.store.schema_snapshot > docs/schema.sql"
    )
