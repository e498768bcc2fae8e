"""A worker that stops reading its command pipe (SIGSTOP) must not stop the agent.

The agent used to write commands to the worker's pipe from its main loop: once the pipe was
full (64 KiB: a few StartPrefills of long prompts) the write blocked that loop, heartbeats
included, and the control plane detached the node. Now commands wait in an outbox written by
a thread of its own, and a worker that leaves a command unread for two group timeouts is
killed and respawned like a dead one, its requests reported Failed (retryable).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Any

import pytest
from conftest import Reference, prompt
from scripted import ScriptedControlPlane

from protos.pecsched.v1 import cluster_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GROUP_TIMEOUT_S = 2.0  # the worker counts as stuck after 2 group timeouts: 4 s
NUM_STUCK_COMMANDS = 40  # StartPrefills of PROMPT_TOKENS tokens: ~6 KB each, > 64 KiB in all
PROMPT_TOKENS = 3000
NUM_HEARTBEATS = 15  # 3 s of heartbeats at 0.2 s while the pipe is full


def start(rid: str, tokens: list[int], instance: str, max_new: int) -> dict[str, Any]:
    """Keyword arguments of a StartPrefill command."""
    return {
        "start_prefill": cluster_pb2.StartPrefill(
            request_id=rid,
            prompt_token_ids=tokens,
            instance_ids=[instance],
            max_new_tokens=max_new,
            decode_in_place=True,
        )
    }


def test_a_worker_that_stops_reading_its_pipe_stops_neither_heartbeats_nor_the_node(
    reference: Reference,
) -> None:
    from dataplane.agent.agent import run_agent
    from dataplane.agent.config import AgentConfig

    # Prepare: an agent with 2 workers; worker 1 stops (SIGSTOP: alive, reads nothing)
    cp = ScriptedControlPlane(heartbeat_interval_s=0.2)
    port = cp.start()
    config = AgentConfig(
        controlplane=f"127.0.0.1:{port}",
        device="cpu",
        num_workers=2,
        model="tiny",
        roles=("general", "general"),
        kv_budget=None,
        node_id="n5",
        api_key=None,
        group_timeout_s=GROUP_TIMEOUT_S,
    )
    before = {p.pid for p in multiprocessing.active_children()}
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("rc", run_agent(config, install_signals=False)),
        daemon=True,
    )
    thread.start()
    stopped_pid = None
    try:
        cp.wait_for(lambda: cp.registers, 180, "the agent's Register")
        (stopped_pid,) = [
            p.pid
            for p in multiprocessing.active_children()
            if p.name == "pecsched-worker-1" and p.pid not in before
        ]
        os.kill(stopped_pid, signal.SIGSTOP)

        # Execute: fill the stopped worker's pipe, then use the other worker
        stuck_ids = [f"stuck-{k}" for k in range(NUM_STUCK_COMMANDS)]
        for k, rid in enumerate(stuck_ids):
            cp.command(**start(rid, prompt(100 + k, PROMPT_TOKENS), "n5/1", 4))
        beats = len(cp.heartbeats())
        tokens = prompt(200, 20)
        cp.command(**start("beside", tokens, "n5/0", 5))

        # Assert: heartbeats go on and the other worker serves while the pipe is full
        cp.wait_for(
            lambda: len(cp.heartbeats()) >= beats + NUM_HEARTBEATS,
            30,
            f"{NUM_HEARTBEATS} heartbeats while worker 1 reads nothing",
        )
        assert cp.wait_end("beside").HasField("finished")
        assert cp.output("beside") == reference.greedy(tokens, 5)
        # Assert: the stuck worker's requests fail (retryable) once it is killed as stuck
        for rid in stuck_ids:
            failed = cp.wait_event(rid, "failed", 60).failed
            assert failed.retryable and "n5/1" in failed.error, failed
        # Assert: the slot is respawned and serves again; the node never re-registered
        cp.command(**start("after-respawn", tokens, "n5/1", 5))
        assert cp.wait_end("after-respawn", 120).HasField("finished")
        assert cp.output("after-respawn") == reference.greedy(tokens, 5)
        assert len(cp.registers) == 1
    finally:
        if stopped_pid is not None:
            try:
                os.kill(stopped_pid, signal.SIGKILL)  # unblocks an agent that blocked on it
            except ProcessLookupError:
                pass
        if cp.registers:
            cp.command(shutdown=cluster_pb2.Shutdown(drain=False))
        thread.join(timeout=60)
        cp.stop()
    assert result.get("rc") == 0
