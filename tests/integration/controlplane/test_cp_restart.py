"""SIGKILL of the control-plane process and a restart on the same database: every
acknowledged request finishes, decoding ones continuing from their persisted tokens."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cp_harness import (
    GENERAL,
    generate_all,
    migrated_db,
    submit_request,
    wait_all_final,
)
from cp_sim_agent import SimAgent, expected_token
from waiting import eventually

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[3]


async def _spawn(db_url: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pecsched",
            "controlplane",
            "--db",
            db_url,
            "--listen",
            "127.0.0.1:0",
            "--policy",
            "fifo",
            "--no-auth",
            "--heartbeat-interval-s",
            "0.2",
            "--log-level",
            "WARNING",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PECSCHED_TICK_INTERVAL_S": "0.05"},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=60)
    assert "listening on" in line, line
    return process, line.strip().rsplit(" ", 1)[1]


async def test_sigkill_and_restart_finishes_every_acknowledged_request(tmp_path):
    # Prepare
    db_url = migrated_db(tmp_path)
    first, target = await _spawn(db_url)
    agent = SimAgent(target, "node-a", [("a0", GENERAL, 8192)], token_s=0.03)
    await agent.start()
    channel = grpc.aio.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    prompts = [[i % 256, 5, 6] for i in range(12)]
    ids = [(await stub.Submit(submit_request(p, 16))).request_id for p in prompts]

    async def first_decodes() -> bool:
        view = await stub.Get(inference_pb2.GetRequest(request_id=ids[0]))
        return view.output_tokens >= 4

    await eventually(first_decodes, "the first request decoded 4 tokens")
    await channel.close()
    # Execute
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    await agent.stop()
    second, target = await _spawn(db_url)
    again = SimAgent(target, "node-a", [("a0", GENERAL, 8192)])
    again.resident = ids
    channel = grpc.aio.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        await again.start()
        views = await wait_all_final(stub, ids, timeout_s=60)
        # Assert
        for rid, prompt in zip(ids, prompts, strict=True):
            assert views[rid].state == common_pb2.REQUEST_STATE_FINISHED, views[rid]
            tokens, _ = await generate_all(stub, rid)
            assert tokens == [expected_token(prompt, i) for i in range(16)]
        assert views[ids[0]].output_tokens == 16
        continued = [c for c in again.commands if c.WhichOneof("kind") == "start_prefill"]
        assert any(len(c.start_prefill.generated_token_ids) >= 4 for c in continued)
        assert set(again.registered.drop_request_ids) == set(ids)
    finally:
        await channel.close()
        await again.stop()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
