"""Restart benchmark: seconds from `python -m controlplane` starting to health SERVING, with
many unfinished requests in the database.

    .venv/bin/python bench/controlplane_restart.py [--requests 18369] [--prompt-tokens 256]
        [--running-share 0.3] [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]
        [--sqlite] [--baseline-tree DIR] [--rounds 2]

The database (a throw-away PostgreSQL schema, or a SQLite file with --sqlite) is filled through
the repository with `--requests` queued requests; `--running-share` of them are then marked
DECODING with 8 stored output tokens (recovery re-queues those and carries their tokens over).
The control plane starts on a port chosen beforehand; this process polls the standard health
service until it says SERVING and reports the time from spawning the process to the open port
and to SERVING. With --baseline-tree, the same database is recovered by that tree's control
plane too (e.g. an older commit exported with `git archive`), alternating with this tree's,
`--rounds` times each. The database is the same for every start: each start re-queues the
same requests (a recovered DECODING request is QUEUED afterwards, so the later starts of a
round recover only queued ones; the first start of each tree is reported apart).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from controlplane_server import (  # noqa: E402
    cpu_s,
    create_schema,
    drop_schema,
    spawn_controlplane,
    stop_process,
)

from controlplane.core.types import RequestClass, RequestSpec, RequestState  # noqa: E402
from controlplane.store import migrate  # noqa: E402
from controlplane.store.engine import make_engine  # noqa: E402
from controlplane.store.records import NewRequest  # noqa: E402
from controlplane.store.sql_repository import SqlRepository  # noqa: E402

BATCH = 2000
# Retry a closed port every few ms (gRPC's default reconnect back-off starts at 1 s).
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 20),
]
OUTPUT_TOKENS = 8  # stored per running request


def fill(db_url: str, num_requests: int, prompt_tokens: int, running_share: float) -> None:
    """Migrate `db_url` and add the requests (see the module docstring)."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    repo = SqlRepository(engine)
    prompt = [i % 30_000 for i in range(prompt_tokens)]
    num_running = int(num_requests * running_share)
    for start in range(0, num_requests, BATCH):
        news = []
        for i in range(start, min(num_requests, start + BATCH)):
            spec = RequestSpec(f"req-{i:08d}", f"tenant-{i % 7}", prompt_tokens, 64, 0, i * 1e-3)
            news.append(NewRequest(spec, RequestClass.SHORT, prompt))
        with repo.transaction(write=True):
            results = repo.add_requests(news)
            running = [r.view for r in results if int(r.view.request_id[4:]) < num_running]
            repo.update_requests(
                [
                    replace(
                        v,
                        state=RequestState.DECODING,
                        first_scheduled_s=v.spec.arrival_s,
                        decode_instance_ids=("node-a/0",),
                        output_tokens=OUTPUT_TOKENS,
                    )
                    for v in running
                ]
            )
            for view in running:
                repo.append_output_tokens(view.request_id, 0, list(range(OUTPUT_TOKENS)))
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def time_to_serving(
    tree: Path, db_url: str, timeout_s: float = 120.0
) -> tuple[float, float, float]:
    """Spawn `tree`'s control plane on `db_url`; seconds until its port opens and until its
    health is SERVING, and the CPU seconds the process used until then (on a loaded machine
    the CPU time says more about the code than the wall time)."""
    port = _free_port()
    started = time.perf_counter()
    process = spawn_controlplane(tree, db_url, f"127.0.0.1:{port}")
    port_open_s = 0.0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=_FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - started < timeout_s:
                if process.poll() is not None:
                    raise RuntimeError(f"control plane exited with {process.returncode}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.RpcError:
                    time.sleep(0.005)
                    continue
                port_open_s = port_open_s or time.perf_counter() - started
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return port_open_s, time.perf_counter() - started, cpu_s(process.pid)
                time.sleep(0.005)
        raise TimeoutError(f"not SERVING within {timeout_s} s")
    finally:
        stop_process(process, 60)


def main() -> int:
    """Fill a database, then time restarts of this tree (and the baseline's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=18_369)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--running-share", type=float, default=0.3)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file, not PostgreSQL")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        schema = ""
        if args.sqlite:
            db_url = f"sqlite:///{Path(directory) / 'restart.db'}"
        else:
            db_url, schema = create_schema(args.postgres, "restart")
        try:
            fill(db_url, args.requests, args.prompt_tokens, args.running_share)
            trees = [("this tree", REPO_ROOT)]
            if args.baseline_tree is not None:
                trees.append(("baseline", args.baseline_tree.resolve()))
            print(
                f"{args.requests:,} unfinished requests ({args.prompt_tokens}-token prompts, "
                f"{args.running_share:.0%} decoding at the first start), "
                f"{'SQLite' if args.sqlite else 'PostgreSQL'}\n"
                "| tree | start | port open (s) | SERVING (s) | CPU until SERVING (s) |\n"
                "|---|---:|---:|---:|---:|"
            )
            for round_index in range(args.rounds):
                for name, tree in trees if round_index % 2 == 0 else trees[::-1]:
                    port_s, serving_s, cpu_s = time_to_serving(tree, db_url)
                    print(
                        f"| {name} | {round_index + 1} | {port_s:.2f} | {serving_s:.2f} | "
                        f"{cpu_s:.2f} |"
                    )
        finally:
            if schema:
                drop_schema(args.postgres, schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
