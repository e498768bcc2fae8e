"""`python -m dataplane agent` as a real process: re-attach after a control-plane restart, and
a graceful drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Reference, prompt
from scripted import ScriptedControlPlane

from dataplane.agent.config import API_KEY_ENV
from protos.pecsched.v1 import cluster_pb2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def _start(
    rid: str, tokens: list[int], max_new: int, in_place: bool = True, chunk_tokens: int = 0
) -> dict:
    return {
        "start_prefill": cluster_pb2.StartPrefill(
            request_id=rid,
            prompt_token_ids=tokens,
            instance_ids=["n2/0"],
            max_new_tokens=max_new,
            decode_in_place=in_place,
            chunk_tokens=chunk_tokens,
        )
    }


def _kv_used(cp: ScriptedControlPlane) -> int | None:
    beats = cp.heartbeats()
    return None if not beats else int(beats[-1].loads[0].kv_used_tokens)


def test_reattach_after_restart_then_drain_on_sigterm(tmp_path: Path, reference: Reference) -> None:
    # Prepare: a control plane and an agent process with one worker
    cp = ScriptedControlPlane(heartbeat_interval_s=0.2)
    port = cp.start()
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "dataplane", "agent", "--controlplane", f"127.0.0.1:{port}",
         "--workers", "1", "--model", "tiny", "--node-id", "n2", "--drain-timeout", "6"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, API_KEY_ENV: "key-from-env"},
    )  # fmt: skip
    cp2 = ScriptedControlPlane(heartbeat_interval_s=0.2)
    try:
        cp.wait_for(lambda: cp.registers, 180, "Register")
        assert cp.metadata[0]["authorization"] == "Bearer key-from-env"
        cp.command(**_start("held", prompt(20, 30), 5, in_place=False))
        cp.wait_event("held", "prefill_done")
        long_tokens = prompt(21, 10)
        cp.command(**_start("through-restart", long_tokens, 1500))
        cp.wait_for(lambda: cp.output("through-restart"), 30, "decoding")

        # Execute 1: the control plane restarts on the same port and drops "held"
        cp.stop()
        cp2.drop_request_ids = ["held"]
        cp2.start(port)
        reg = cp2.wait_for(lambda: cp2.registers, 60, "re-Register")[0]

        # Assert 1
        assert "held" in reg.resident_request_ids
        assert [i.instance_id for i in reg.instances] == ["n2/0"]
        end = cp2.wait_end("through-restart", 120)
        assert end.finished.output_tokens == 1500, "work finished across the reconnect"
        cp2.wait_for(lambda: _kv_used(cp2) == 0, 30, "dropped KV to be freed")
        assert not cp2.events("held"), "a dropped request reports nothing"

        # Execute 2: SIGTERM while one request decodes, one is paused and one is held for a
        # transfer that never comes (it keeps the drain waiting until its deadline)
        tokens = prompt(22, 12)
        cp2.command(**_start("held-in-drain", prompt(24, 20), 5, in_place=False))
        cp2.wait_event("held-in-drain", "prefill_done")
        cp2.command(**_start("drain-me", tokens, 200))
        # 100 chunks of 4 tokens: the Pause right behind it lands long before the prefill ends
        # (one chunk of 400 could finish first, and a Pause after the prefill goes unanswered)
        cp2.command(**_start("paused", prompt(23, 400), 5, chunk_tokens=4))
        cp2.command(pause=cluster_pb2.Pause(request_id="paused"))
        cp2.wait_event("paused", "paused")
        cp2.wait_for(lambda: cp2.output("drain-me"), 30, "drain-me to decode")
        agent.send_signal(signal.SIGTERM)
        # the drain began: it hands the paused request back at once
        handed_back = cp2.wait_event("paused", "failed").failed
        cp2.command(**_start("too-late", tokens, 3))

        # Assert 2
        assert agent.wait(timeout=120) == 0
        assert handed_back.retryable and "draining" in handed_back.error
        assert cp2.wait_end("drain-me").HasField("finished")
        assert cp2.output("drain-me") == reference.greedy(tokens, 200)
        refused = cp2.wait_event("too-late", "failed").failed
        assert refused.retryable and "draining" in refused.error
        at_deadline = cp2.wait_event("held-in-drain", "failed").failed
        assert at_deadline.retryable and "drained" in at_deadline.error
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait()
        cp.stop()
        cp2.stop()
        log.close()
        print((tmp_path / "agent.log").read_text()[-3000:])
