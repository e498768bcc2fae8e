"""The engine factory's dialect settings and the one DB-error translation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from repository_contract import make_new_request, make_node
from sqlalchemy import event

from controlplane.store.engine import make_engine
from controlplane.store.errors import Conflict, StoreErrorCode, Unavailable
from controlplane.store.memory import InMemoryRepository
from controlplane.store.repository import ReadOnlyTransactionError
from controlplane.store.sql_repository import SqlRepository
from controlplane.store.tables import metadata


def test_sqlite_file_gets_wal_foreign_keys_full_sync_and_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")

    with engine.connect() as connection:
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
        }
    engine.dispose()

    assert pragmas == {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "synchronous": 2,
        "busy_timeout": 10_000,
    }


def test_committed_requests_survive_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = make_engine(url)
    metadata.create_all(engine)
    SqlRepository(engine).add_request(make_new_request("r1"))
    engine.dispose()

    reopened = make_engine(url)
    view = SqlRepository(reopened).get_request("r1")
    reopened.dispose()

    assert view.request_id == "r1"


def test_concurrent_writers_wait_for_the_lock_instead_of_failing(tmp_path: Path) -> None:
    # Two threads share one repository, a third uses its own engine (like another process);
    # each transaction reads before it writes, the pattern that fails with SQLITE_BUSY when
    # a deferred transaction has to upgrade its lock.
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engines = [make_engine(url), make_engine(url)]
    metadata.create_all(engines[0])
    shared, own = SqlRepository(engines[0]), SqlRepository(engines[1])
    errors: list[BaseException] = []

    def submit(worker: int, repo: SqlRepository) -> None:
        try:
            for i in range(25):
                with repo.transaction(write=True):
                    repo.unfinished_with_inputs()
                    repo.add_request(make_new_request(f"w{worker}-{i}", arrival_s=float(i)))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [
        threading.Thread(target=submit, args=(worker, repo))
        for worker, repo in enumerate((shared, shared, own))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    count = len(own.unfinished_with_inputs())
    for engine in engines:
        engine.dispose()

    assert errors == []
    assert count == 75


def test_unreachable_database_is_unavailable() -> None:
    repo = SqlRepository(make_engine("sqlite:////nonexistent-dir/x/p.db"))

    with pytest.raises(Unavailable) as raised:
        repo.get_request("r1")

    assert raised.value.code is StoreErrorCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://u@h/db", "psycopg driver"),
    ],
)
def test_unsupported_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_engine(url)


def test_memory_repository_is_isolated_per_instance() -> None:
    first, second = InMemoryRepository(), InMemoryRepository()

    first.add_request(make_new_request("r1"))

    assert second.unfinished_with_inputs() == []


def test_a_write_statement_in_a_read_only_scope_fails() -> None:
    engine = make_engine("sqlite://")
    metadata.create_all(engine)
    repo = SqlRepository(engine)

    with pytest.raises(ReadOnlyTransactionError), repo.uow.scope(write=False) as connection:
        connection.exec_driver_sql("DELETE FROM requests")
    with repo.uow.scope(write=False) as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM requests").scalar() == 0
    engine.dispose()


def test_a_check_constraint_violation_is_a_conflict() -> None:
    engine = make_engine("sqlite://")
    metadata.create_all(engine)
    repo = SqlRepository(engine)
    repo.upsert_node(make_node())

    with pytest.raises(Conflict, match="ck_instances_tp"), repo.uow.scope(write=True) as conn:
        conn.exec_driver_sql(
            "INSERT INTO instances VALUES ('i-1', 'node-a', 'general', 'up', 0, '', 1, 0.0)"
        )
    engine.dispose()


def test_hot_paths_run_one_statement(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    metadata.create_all(engine)
    repo = SqlRepository(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))

    def count(action: Callable[[], object]) -> int:
        statements.clear()
        action()
        return len([s for s in statements if not s.startswith(("BEGIN", "COMMIT"))])

    batch = [make_new_request(f"b{i}", key=f"k{i}") for i in range(50)]
    assert count(lambda: repo.add_request(make_new_request("r1", key="k"))) == 1
    assert count(lambda: repo.add_request(make_new_request("r2"))) == 1
    assert count(lambda: repo.add_requests(batch)) == 2  # INSERT batch + one SELECT of keys
    assert count(lambda: repo.add_requests([make_new_request(f"n{i}") for i in range(9)])) == 1
    views = [repo.get_request(f"b{i}") for i in range(50)]
    assert count(lambda: repo.update_requests(views)) == 1
    engine.dispose()
