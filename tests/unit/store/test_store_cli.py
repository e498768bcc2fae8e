"""`pecsched db upgrade|current` and `pecsched keys create|revoke`, run in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.store import migrate
from controlplane.store.engine import make_engine
from controlplane.store.records import ApiKeyRole
from controlplane.store.sql_repository import SqlRepository
from pecsched.cli import main


def test_db_upgrade_then_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    head = migrate.head_revision()

    assert main(["db", "current", "--db", url]) == 1
    assert f"head is {head}; run `pecsched db upgrade --db '{url}'`" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"upgraded <empty> -> {head}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"already at head {head}" in capsys.readouterr().out
    assert main(["db", "current", "--db", url]) == 0
    assert capsys.readouterr().out.strip() == f"{head} (head)"


def test_keys_create_prints_a_key_that_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    capsys.readouterr()

    code = main(["keys", "create", "--role", "admin", "--tenant", "ops", "--db", url])

    key = capsys.readouterr().out.strip()
    assert code == 0
    engine = make_engine(url)
    record = SqlRepository(engine).verify_api_key(key)
    engine.dispose()
    assert record is not None and (record.role, record.tenant) == (ApiKeyRole.ADMIN, "ops")


def test_keys_create_on_a_stale_database_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"

    code = main(["keys", "create", "--role", "client", "--tenant", "t", "--db", url])

    assert code == 1
    assert "pecsched db upgrade --db" in capsys.readouterr().err


def test_unreachable_database_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["db", "current", "--db", "sqlite:////nonexistent-dir/x/p.db"])

    assert code == 1
    assert "error:" in capsys.readouterr().err


def test_upgrade_of_an_unreachable_server_is_a_clean_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2"

    code = main(["db", "upgrade", "--db", url])

    assert code == 1
    assert "error: database unavailable" in capsys.readouterr().err


def test_keys_revoke_makes_a_key_unusable_and_names_an_unknown_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    assert main(["keys", "create", "--role", "client", "--tenant", "t", "--db", url]) == 0
    key = capsys.readouterr().out.strip()
    key_id = key.split("_")[1]
    # Execute
    revoked = main(["keys", "revoke", key_id, "--db", url])
    unknown = main(["keys", "revoke", "0" * len(key_id), "--db", url])
    # Assert
    engine = make_engine(url)
    record = SqlRepository(engine).verify_api_key(key)
    engine.dispose()
    assert (revoked, unknown, record) == (0, 1, None)
    assert "not found" in capsys.readouterr().err
