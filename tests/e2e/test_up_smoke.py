"""`pecsched up --demo-only` (what `make run` runs, shortened) and `pecsched sim` as real
subprocesses of a copy of the repository: its tracked files only, no sibling folder beside it, run
from another directory with PYTHONPATH pointing at the copy."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pecsched.cluster import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files that git knows (tracked, or new and not ignored) under a fresh
    directory `.../repo`, with nothing beside it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    copy = tmp_path_factory.mktemp("fresh-clone") / "repo"
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def _run_from_copy(copy: Path, cwd: Path, args: list[str], timeout_s: float) -> str:
    """Run `python args...` with only the copy on PYTHONPATH, from `cwd`; returns stdout."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_the_copy_is_what_runs(repo_copy: Path, tmp_path: Path) -> None:
    # Execute
    out = _run_from_copy(
        repo_copy,
        tmp_path / "elsewhere",
        ["-c", "import pecsched, sim.workloads as w; print(pecsched.__file__, *w.AZURE_TRACES)"],
        timeout_s=60,
    )

    # Assert: the package and the bundled traces both come from the copy
    paths = [Path(p) for p in out.split()]
    assert len(paths) == 3, out
    assert all(p.is_relative_to(repo_copy) and p.is_file() for p in paths), out
    assert [p.name for p in repo_copy.parent.iterdir()] == ["repo"]  # nothing beside it


def test_sim_runs_from_a_copy(repo_copy: Path, tmp_path: Path) -> None:
    # Prepare
    out_json = tmp_path / "sim.json"

    # Execute
    stdout = _run_from_copy(
        repo_copy,
        tmp_path / "elsewhere",
        ["-m", "pecsched", "sim", "--gpus", "8", "--gpu", "a100", "--model", "mistral-7b",
         "--policy", "fifo,pecsched", "--max-requests", "300", "--jobs", "1",
         "--json", str(out_json)],
        timeout_s=300,
    )  # fmt: skip

    # Assert
    results = json.loads(out_json.read_text())["results"]
    assert [r["policy"] for r in results] == ["fifo", "pecsched"], stdout
    assert "pecsched" in stdout


def test_up_demo_only_compares_fifo_and_pecsched_from_a_copy(
    repo_copy: Path, tmp_path: Path
) -> None:
    # Prepare
    db_path = tmp_path / "pecsched.db"
    log_dir = tmp_path / "logs"

    # Execute: 20 s of arrivals per policy (the default is 60)
    stdout = _run_from_copy(
        repo_copy,
        tmp_path / "elsewhere",
        ["-m", "pecsched", "up", "--demo-only", "--demo-duration", "20",
         "--port", str(free_port()), "--db", f"sqlite:///{db_path}", "--log-dir", str(log_dir),
         "--http-port", str(free_port())],
        timeout_s=540,
    )  # fmt: skip

    # Assert: a table per policy, then the comparison, then the plot
    fifo_at = stdout.index("policy fifo:")
    pecsched_at = stdout.index("policy pecsched:")
    comparison_at = stdout.index("the same requests under fifo and pecsched:")
    assert fifo_at < pecsched_at < comparison_at, stdout
    comparison = stdout[comparison_at:]
    for label in ("short queueing delay p99 (s)", "short TBT p99 (s)", "long JCT p50 (s)",
                  "preemptions", "colocations", "KV transfers"):  # fmt: skip
        assert label in comparison, comparison
    plot = log_dir / "demo-short-queueing-delay.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(plot) in stdout
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        (finished,) = db.execute(
            "SELECT count(*) FROM requests WHERE state = 'finished'"
        ).fetchone()
        history = db.execute("SELECT * FROM request_history LIMIT 10").fetchall()
    assert finished > 0
    assert history
