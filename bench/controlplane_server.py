"""What the control-plane benchmarks share (bench/controlplane_load.py,
bench/controlplane_restart.py): a tree's `python -m controlplane` started as its own process
and stopped, its CPU time from /proc, and a throw-away PostgreSQL schema. Imported by those
scripts (their folder is on sys.path); run alone it does nothing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path


def spawn_controlplane(
    tree: Path,
    db_url: str,
    listen: str,
    extra_env: dict[str, str] | None = None,
    *,
    pipe_stdout: bool = False,
) -> subprocess.Popen[str]:
    """Start `tree`'s control plane on `db_url` at `listen` (fifo policy, no authentication,
    warnings only); its stdout is a text pipe with `pipe_stdout`, else discarded."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--db",
            db_url,
            "--listen",
            listen,
            "--policy",
            "fifo",
            "--no-auth",
            "--log-level",
            "WARNING",
        ],
        cwd=tree,
        stdout=subprocess.PIPE if pipe_stdout else subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree), **(extra_env or {})},
    )


def stop_process(process: subprocess.Popen[str], timeout_s: float) -> None:
    """SIGTERM, then wait up to `timeout_s` for the exit."""
    process.terminate()
    process.wait(timeout=timeout_s)


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all threads), or of its thread `tid`."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_schema(server_url: str, prefix: str) -> tuple[str, str]:
    """A fresh schema `<prefix>_<pid>_<random>` on the PostgreSQL server at `server_url`;
    returns the URL that uses it and its name (drop it with `drop_schema`)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from controlplane.store.engine import make_engine

    schema = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = make_engine(server_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    url = make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def drop_schema(server_url: str, schema: str) -> None:
    """Drop a schema of `create_schema` with everything in it."""
    from sqlalchemy import text

    from controlplane.store.engine import make_engine

    admin = make_engine(server_url)
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
