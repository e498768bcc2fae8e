"""The `pecsched controlplane` process: stale schema refused, metrics served, clean SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from cp_harness import migrated_db, submit_request
from waiting import eventually

from protos.pecsched.v1 import inference_pb2_grpc

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[3]


def _command(db_url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pecsched", "controlplane", "--db", db_url,
        "--listen", "127.0.0.1:0", "--no-auth", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def test_stale_schema_is_refused_with_the_fixing_command(tmp_path):
    # Execute
    done = subprocess.run(
        _command(f"sqlite:///{tmp_path / 'empty.db'}"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Assert
    assert done.returncode == 3
    assert "pecsched db upgrade --db" in done.stderr


def test_unknown_policy_is_refused_naming_the_choices(tmp_path):
    done = subprocess.run(
        _command(migrated_db(tmp_path), "--policy", "nope"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "pecsched" in done.stderr and "fifo" in done.stderr


async def test_metrics_port_serves_prometheus_text_and_sigterm_exits_cleanly(tmp_path):
    # Prepare
    process = subprocess.Popen(
        _command(migrated_db(tmp_path), "--metrics-port", "0", "--log-level", "INFO"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PECSCHED_TICK_INTERVAL_S": "0.05"},
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=60)
        target = line.strip().rsplit(" ", 1)[1]
        metrics_url = None
        while metrics_url is None:
            log = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), timeout=60)
            if "metrics on " in log:
                metrics_url = log.strip().rsplit(" ", 1)[1]
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            await stub.Submit(submit_request(list(range(10)), 2))
        expected = (
            'pecsched_submits_total{result="created"} 1',
            'pecsched_queue_depth{request_class="short"} 1',  # with the next snapshot (1 s)
            'pecsched_tokens_total{kind="prompt",request_class="short"} 10',
        )

        # Execute
        async def scrape() -> str:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url).read())
            return body.decode()

        async def all_exported() -> bool:
            text = await scrape()
            return all(line in text for line in expected)

        await eventually(all_exported, "the submit in the exported metrics")
        # Assert
        text = await scrape()
        for line in expected:
            assert line in text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
