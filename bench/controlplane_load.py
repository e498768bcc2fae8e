"""Control-plane load benchmark: durable submits/s, Submit latency, scheduling decision time.

    .venv/bin/python bench/controlplane_load.py [--seconds 10] [--concurrency 64]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--skip-sql]

1. Submit throughput: `python -m controlplane` runs as its own process on a fresh database
   (SQLite file, then PostgreSQL in a throw-away schema); this process attaches simulated
   agents over loopback (they finish every request at once) and drives `concurrency`
   concurrent Submit calls for `seconds`. Every acknowledged Submit is committed (group commit).
   The server's CPU time per submit (from /proc) is reported too: on a shared, loaded machine
   it says more about the code than the wall-clock rate does.
2. Decision time: the pecsched and sarathi policies alone, with 1,000 instances and 10,000
   queued requests; each step finishes one running request and times the `schedule()` that
   refills its slot.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from sqlalchemy import text
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

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
    cluster_pb2,
    cluster_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- simulated agent -------------------------------------------------------------------------


async def _fast_agent(target: str, node_id: str, num_instances: int, stop: asyncio.Event) -> None:
    """Attach and finish every StartPrefill at once (prefill done, one token, finished)."""
    queue: asyncio.Queue[cluster_pb2.AgentMessage | None] = asyncio.Queue()
    seq = 0

    def send(**body: object) -> None:
        nonlocal seq
        seq += 1
        queue.put_nowait(cluster_pb2.AgentMessage(seq=seq, **body))  # type: ignore[arg-type]

    async def outgoing():  # type: ignore[no-untyped-def]
        while (message := await queue.get()) is not None:
            yield message

    send(
        register=cluster_pb2.Register(
            node_id=node_id,
            model="tiny",
            instances=[
                cluster_pb2.InstanceSpec(
                    instance_id=f"{node_id}/{i}",
                    role=common_pb2.INSTANCE_ROLE_GENERAL,
                    tp=1,
                    kv_capacity_tokens=1_000_000,
                )
                for i in range(num_instances)
            ],
        )
    )
    async with grpc.aio.insecure_channel(target) as channel:
        call = cluster_pb2_grpc.ClusterStub(channel).Attach(outgoing())
        registered = (await call.read()).registered

        async def beat() -> None:
            while True:
                await asyncio.sleep(registered.heartbeat_interval_s / 2)
                send(heartbeat=cluster_pb2.Heartbeat())

        beating = asyncio.ensure_future(beat())
        reader = asyncio.ensure_future(call.read())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait((reader, stopper), return_when=asyncio.FIRST_COMPLETED)
            if stopper in done or reader.result() is grpc.aio.EOF:
                break
            message = reader.result()
            reader = asyncio.ensure_future(call.read())
            if message.command.WhichOneof("kind") != "start_prefill":
                continue
            prefill = message.command.start_prefill
            rid, iid = prefill.request_id, prefill.instance_ids[0]
            send(
                event=cluster_pb2.Event(
                    request_id=rid,
                    instance_id=iid,
                    prefill_done=cluster_pb2.PrefillDone(first_token_id=65),
                )
            )
            send(
                event=cluster_pb2.Event(
                    request_id=rid,
                    instance_id=iid,
                    tokens=cluster_pb2.Tokens(start_index=0, token_ids=[65]),
                )
            )
            send(
                event=cluster_pb2.Event(
                    request_id=rid, instance_id=iid, finished=cluster_pb2.Finished(output_tokens=1)
                )
            )
        reader.cancel()
        beating.cancel()
        queue.put_nowait(None)
        call.cancel()


# ---- submit load -----------------------------------------------------------------------------


async def _spawn_controlplane(db_url: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--db",
            db_url,
            "--listen",
            "127.0.0.1:0",
            "--policy",
            "fifo",
            "--no-auth",
            "--log-level",
            "WARNING",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PECSCHED_MAX_ACTIVE_REQUESTS": "1000000",
            "PECSCHED_MAX_ACTIVE_REQUESTS_PER_TENANT": "1000000",
        },
    )
    assert process.stdout is not None
    line = await asyncio.to_thread(process.stdout.readline)
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"control plane did not start: {line!r}")
    return process, line.strip().rsplit(" ", 1)[1]


async def submit_load(
    db_url: str, seconds: float, concurrency: int, with_agents: bool = True
) -> dict[str, float]:
    """Run the submit load against a control plane on `db_url`; returns the measurements.

    With `with_agents`, two simulated agents finish every request at once (the server also
    dispatches, applies 3 events and persists completion per request); without, requests
    stay queued and only the durable submit path is measured.
    """
    process, target = await _spawn_controlplane(db_url)
    stop = asyncio.Event()
    agents = [
        asyncio.ensure_future(_fast_agent(target, f"node-{i}", 8, stop))
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

            started, cpu_before = time.perf_counter(), _cpu_s(process.pid)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            cpu = _cpu_s(process.pid) - cpu_before
    finally:
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        process.terminate()
        process.wait(timeout=30)
    return {
        "submits_per_s": len(latencies) / elapsed,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "num": float(len(latencies)),
        "cpu_ms_per_submit": cpu / max(1, len(latencies)) * 1e3,
    }


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
    schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = make_engine(server_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    url = make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
    rendered = url.render_as_string(hide_password=False)
    engine = make_engine(rendered)
    migrate.upgrade(engine)
    engine.dispose()
    return rendered, schema


def _drop_schema(server_url: str, schema: str) -> None:
    admin = make_engine(server_url)
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def main() -> int:
    """Run the benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--skip-sql", action="store_true", help="only the decision benchmark")
    args = parser.parse_args()
    print("| benchmark | result |\n|---|---|")
    for name in ("pecsched", "sarathi"):
        decision = decision_time(name)
        print(
            f"| decision, {name}, 1,000 instances, 10,000 queued (3,000 steps) | "
            f"wall p50 {decision['p50_us']:.0f} us, p99 {decision['p99_us']:.0f} us, "
            f"mean {decision['mean_us']:.0f} us; CPU p50 {decision['cpu_p50_us']:.0f} us, "
            f"p99 {decision['cpu_p99_us']:.0f} us; first decision placing "
            f"{decision['first_actions']} requests {decision['first_decision_ms']:.0f} ms |"
        )
    if args.skip_sql:
        return 0
    for with_agents in (True, False):
        mode = "agents finish each request" if with_agents else "queue only, no agents"
        with tempfile.TemporaryDirectory() as directory:
            db = _sqlite_db(Path(directory))
            sqlite = asyncio.run(submit_load(db, args.seconds, args.concurrency, with_agents))
        print(_row(f"SQLite (WAL, synchronous=FULL), {mode}", sqlite, args.concurrency))
        try:
            url, schema = _postgres_db(args.postgres)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"| PostgreSQL | not run: {exc!r} |")
            continue
        try:
            postgres = asyncio.run(submit_load(url, args.seconds, args.concurrency, with_agents))
        finally:
            _drop_schema(args.postgres, schema)
        print(_row(f"PostgreSQL, {mode}", postgres, args.concurrency))
    return 0


def _row(name: str, result: dict[str, float], concurrency: int) -> str:
    return (
        f"| durable Submit, {name}, {concurrency} concurrent | "
        f"{result['submits_per_s']:,.0f} submits/s; p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms ({int(result['num']):,} submits); server CPU "
        f"{result['cpu_ms_per_submit']:.2f} ms per submit "
        f"= {1e3 / result['cpu_ms_per_submit']:,.0f} submits/s per busy core |"
    )


if __name__ == "__main__":
    sys.exit(main())
