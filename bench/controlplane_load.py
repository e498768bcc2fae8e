"""Control-plane load benchmark: durable submits/s, Submit latency, scheduling decision time.

    .venv/bin/python bench/controlplane_load.py [--seconds 8] [--concurrency 300] [--rounds 1]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--skip-sql]
        [--skip-sqlite] [--baseline-tree DIR]

1. Submit throughput: `python -m controlplane` runs as its own process on a fresh database
   (SQLite file, then PostgreSQL in a throw-away schema); this process attaches simulated
   agents over loopback (they finish every request at once) and drives `concurrency`
   concurrent Submit calls for `seconds`. Every acknowledged Submit is committed (group commit).
   The server's CPU time per submit (from /proc) is reported too, split into the event-loop
   thread (gRPC, validation) and the others (the tick thread's transaction, gRPC's own
   threads): on a shared, loaded machine it says more about the code than the rate does.
   The reference of each round is the database's own rate of single-row durable inserts (one
   INSERT and COMMIT at a time, 64-token prompts, for `seconds`). With --baseline-tree, the
   control plane of that tree (e.g. an earlier commit, `git archive REV | tar -x -C DIR`)
   serves the same load in the same round, alternating which runs first.
2. Decision time: the pecsched and sarathi policies alone, with 1,000 instances and 10,000
   queued requests; each step finishes one running request and times the `schedule()` that
   refills its slot.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from sqlalchemy import text

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from controlplane_fast_agent import fast_agent  # noqa: E402
from controlplane_server import (  # noqa: E402
    cpu_s,
    create_schema,
    drop_schema,
    spawn_controlplane,
    stop_process,
)

from controlplane.core.config import SchedulerConfig  # noqa: E402
from controlplane.core.events import (  # noqa: E402  # noqa: E402
    InstanceUp,
    PrefillDone,
    RequestArrived,
    RequestFinished,
    TokensGenerated,
)
from controlplane.core.policies.registry import make_policy  # noqa: E402
from controlplane.core.types import InstanceRole, InstanceSpec, RequestSpec  # noqa: E402
from controlplane.store import migrate  # noqa: E402
from controlplane.store.engine import make_engine  # noqa: E402
from protos.pecsched.v1 import (  # noqa: E402  # noqa: E402
    inference_pb2,
    inference_pb2_grpc,
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- submit load -----------------------------------------------------------------------------


async def _spawn_controlplane(db_url: str, tree: Path) -> tuple[subprocess.Popen[str], str]:
    process = spawn_controlplane(
        tree,
        db_url,
        "127.0.0.1:0",
        {
            "PECSCHED_MAX_ACTIVE_REQUESTS": "1000000",
            "PECSCHED_MAX_ACTIVE_REQUESTS_PER_TENANT": "1000000",
        },
        pipe_stdout=True,
    )
    assert process.stdout is not None
    line = await asyncio.to_thread(process.stdout.readline)
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"control plane did not start: {line!r}")
    return process, line.strip().rsplit(" ", 1)[1]


async def submit_load(
    db_url: str, seconds: float, concurrency: int, with_agents: bool = True, tree: Path = REPO_ROOT
) -> dict[str, float]:
    """Run the submit load against `tree`'s control plane on `db_url`; returns the
    measurements.

    With `with_agents`, two simulated agents finish every request at once (the server also
    dispatches, applies 3 events and persists completion per request); without, requests
    stay queued and only the durable submit path is measured. With `db_url` "noop", the
    server is a Submit servicer that answers at once (`--serve-noop`): the cost of gRPC
    alone, for this client on this machine.
    """
    if db_url == "noop":
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve-noop"], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        target = (await asyncio.to_thread(process.stdout.readline)).strip().rsplit(" ", 1)[1]
        with_agents = False
    else:
        process, target = await _spawn_controlplane(db_url, tree)
    stop = asyncio.Event()
    agents = [
        asyncio.ensure_future(fast_agent(target, f"node-{i}", 8, stop))
        for i in range(2 if with_agents else 0)
    ]
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.SubmitRequest(
                token_ids=inference_pb2.TokenIds(ids=list(range(64))), max_new_tokens=1
            )
            await stub.Submit(request)  # warm up
            end = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    await stub.Submit(request)
                    latencies.append(time.perf_counter() - started)

            pid = process.pid
            started, cpu_before, main_before = time.perf_counter(), cpu_s(pid), cpu_s(pid, pid)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            cpu = cpu_s(pid) - cpu_before
            main_cpu = cpu_s(pid, pid) - main_before
    finally:
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        stop_process(process, 30)
    return {
        "submits_per_s": len(latencies) / elapsed,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "num": float(len(latencies)),
        "cpu_ms_per_submit": cpu / max(1, len(latencies)) * 1e3,
        "loop_cpu_ms_per_submit": main_cpu / max(1, len(latencies)) * 1e3,
    }


class _NoopInference(inference_pb2_grpc.InferenceServicer):
    async def Submit(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.SubmitRequest, context: object
    ) -> inference_pb2.SubmitResponse:
        return inference_pb2.SubmitResponse(request_id="req-" + "0" * 32, prompt_tokens=64)


async def _serve_noop() -> None:
    """A gRPC server whose Submit answers at once, until killed."""
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(_NoopInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"noop listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def single_row_inserts(db_url: str, seconds: float) -> float:
    """Durable single-row inserts/s of the database (one INSERT, one COMMIT at a time)."""
    engine = make_engine(db_url)
    prompt = bytes(4 * 64)
    statement = text(
        "INSERT INTO requests (id, tenant, request_class, state, prompt_token_ids, prompt_tokens,"
        " max_new_tokens, temperature, top_p, seed, stop_at_eos, priority, output_tokens,"
        " num_preemptions, num_requeues, paused_total_s, prefill_instance_ids,"
        " decode_instance_ids, chunks_done, chunks_total, arrival_s) VALUES (:id, 't', 'short',"
        " 'queued', :prompt, 64, 1, 0, 0, 0, true, 0, 0, 0, 0, 0, '', '', 0, 0, 0)"
    )
    count = 0
    try:
        with engine.connect() as connection:
            end = time.perf_counter() + seconds
            started = time.perf_counter()
            while time.perf_counter() < end:
                with connection.begin():
                    connection.execute(statement, {"id": f"ref-{count}", "prompt": prompt})
                count += 1
            return count / (time.perf_counter() - started)
    finally:
        engine.dispose()


# ---- decision time ---------------------------------------------------------------------------


def decision_time(
    name: str = "pecsched", num_instances: int = 1000, num_queued: int = 10_000, steps: int = 3000
) -> dict:
    """Time schedule() of policy `name` with a full cluster and a long queue."""
    policy = make_policy(name, SchedulerConfig(num_short_decode_instances=0), 1)
    rng = random.Random(1)
    now = 0.0
    policy.observe(
        [
            InstanceUp(InstanceSpec(f"i{i}", "n", InstanceRole.GENERAL, 1, 100_000), now)
            for i in range(num_instances)
        ]
    )
    arrivals = [
        RequestArrived(RequestSpec(f"r{i}", "t", rng.randint(100, 3000), 1, 0, now), now)
        for i in range(num_queued + num_instances)
    ]
    policy.observe(arrivals)
    started = time.perf_counter()
    first = policy.schedule(now)
    first_s = time.perf_counter() - started
    running = [a.request_id for a in first.actions]
    times: list[float] = []
    cpu_times: list[float] = []  # thread CPU time: robust to a loaded, shared machine
    for _ in range(steps):
        now += 0.001
        rid = running.pop(rng.randrange(len(running)))
        policy.observe(
            [PrefillDone(rid, now), TokensGenerated(rid, 1, now), RequestFinished(rid, now)]
        )
        started, cpu_started = time.perf_counter(), time.thread_time()
        decision = policy.schedule(now)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.thread_time() - cpu_started)
        running.extend(a.request_id for a in decision.actions if a.request_id != rid)
        policy.take_completed()
    return {
        "first_decision_ms": first_s * 1e3,
        "first_actions": len(first.actions),
        "p50_us": _pct(times, 0.5) * 1e6,
        "p99_us": _pct(times, 0.99) * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
        "cpu_p50_us": _pct(cpu_times, 0.5) * 1e6,
        "cpu_p99_us": _pct(cpu_times, 0.99) * 1e6,
    }


# ---- main ------------------------------------------------------------------------------------


def _sqlite_db(directory: Path) -> str:
    url = f"sqlite:///{directory / 'bench.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def _postgres_db(server_url: str) -> tuple[str, str]:
    url, schema = create_schema(server_url, "bench")
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url, schema


def main() -> int:
    """Run the benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--skip-sql", action="store_true", help="only the decision benchmark")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--skip-decision", action="store_true", help="Submit load only")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout served alongside")
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        asyncio.run(_serve_noop())
        return 0
    if not args.skip_decision:
        _print_decisions()
    if args.skip_sql:
        return 0
    trees = [("this tree", REPO_ROOT)]
    if args.baseline_tree is not None:
        trees.append(("baseline", args.baseline_tree.resolve()))
    print(
        f"Durable Submit, {args.concurrency} concurrent, {args.seconds:g} s per run\n\n"
        "| round | database | mode | tree | submits/s | p50 / p99 ms | server CPU ms per submit "
        "(event loop + other threads) |\n|---|---|---|---|---:|---:|---:|"
    )
    for round_index in range(args.rounds):
        order = trees if round_index % 2 == 0 else trees[::-1]
        for with_agents in (True, False):
            mode = "agents finish each request" if with_agents else "queue only"
            for name, tree in order:
                if not args.skip_sqlite:
                    with tempfile.TemporaryDirectory() as directory:
                        db = _sqlite_db(Path(directory))
                        result = asyncio.run(
                            submit_load(db, args.seconds, args.concurrency, with_agents, tree)
                        )
                    print(_row(round_index, "SQLite", mode, name, result))
                url, schema = _postgres_db(args.postgres)
                try:
                    result = asyncio.run(
                        submit_load(url, args.seconds, args.concurrency, with_agents, tree)
                    )
                finally:
                    drop_schema(args.postgres, schema)
                print(_row(round_index, "PostgreSQL", mode, name, result))
        url, schema = _postgres_db(args.postgres)
        try:
            reference = single_row_inserts(url, args.seconds)
        finally:
            drop_schema(args.postgres, schema)
        print(
            f"| {round_index + 1} | PostgreSQL | reference: single-row durable inserts | | "
            f"{reference:,.0f} | | |"
        )
        floor = asyncio.run(submit_load("noop", args.seconds, args.concurrency))
        print(_row(round_index, "none", "reference: no-op Submit servicer", "", floor))
    return 0


def _print_decisions() -> None:
    """The decision-time table of the pecsched and sarathi policies."""
    print("| benchmark | result |\n|---|---|")
    for name in ("pecsched", "sarathi"):
        decision = decision_time(name)
        print(
            f"| decision, {name}, 1,000 instances, 10,000 queued (3,000 steps) | "
            f"wall p50 {decision['p50_us']:.0f} us, p99 {decision['p99_us']:.0f} us, "
            f"mean {decision['mean_us']:.0f} us; CPU p50 {decision['cpu_p50_us']:.0f} us, "
            f"p99 {decision['cpu_p99_us']:.0f} us; first decision placing "
            f"{decision['first_actions']} requests {decision['first_decision_ms']:.0f} ms |\n"
        )


def _row(round_index: int, database: str, mode: str, tree: str, r: dict[str, float]) -> str:
    loop_ms = r["loop_cpu_ms_per_submit"]
    return (
        f"| {round_index + 1} | {database} | {mode} | {tree} | {r['submits_per_s']:,.0f} | "
        f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['cpu_ms_per_submit']:.2f} "
        f"({loop_ms:.2f} + {r['cpu_ms_per_submit'] - loop_ms:.2f}) |"
    )


if __name__ == "__main__":
    sys.exit(main())
