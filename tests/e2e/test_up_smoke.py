"""`pecsched up --demo-only` (what `make run` runs, shortened) as a real subprocess."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pecsched.cluster import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_up_demo_only_prints_the_table_and_fills_the_database(tmp_path: Path) -> None:
    # Prepare
    db_path = tmp_path / "pecsched.db"
    command = [
        sys.executable, "-m", "pecsched", "up", "--demo-only", "--demo-duration", "20",
        "--port", str(free_port()), "--db", f"sqlite:///{db_path}",
        "--log-dir", str(tmp_path / "logs"), "--http-port", str(free_port()),
    ]  # fmt: skip

    # Execute: from a directory outside the repository (the bundled traces are found anyway)
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=360, check=False
    )

    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "qd p50" in done.stdout and "short" in done.stdout, done.stdout
    assert "KV transfers" in done.stdout, done.stdout
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        (finished,) = db.execute(
            "SELECT count(*) FROM requests WHERE state = 'finished'"
        ).fetchone()
        history = db.execute("SELECT * FROM request_history LIMIT 10").fetchall()
    assert finished > 0
    assert history
