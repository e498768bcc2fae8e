"""A SIGTERMed agent process exits by itself, promptly, with code 0 (README "Known problems").

Its workers used to spend seconds each in Python's interpreter teardown after `Stop` (garbage
collection over torch's modules), so an agent with four workers on a busy host took 8-12 s
from SIGTERM to exit and `pecsched up` (10 s grace) killed it after "drained; exiting".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import prompt
from scripted import ScriptedControlPlane

from protos.pecsched.v1 import cluster_pb2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
NUM_WORKERS = 4  # what `pecsched up` and the e2e cluster run on one node
EXIT_BOUND_S = 5.0  # half the grace of `pecsched up` (pecsched.cluster.STOP_GRACE_S)


def test_sigterm_exits_by_itself_well_inside_the_grace(tmp_path: Path) -> None:
    # Prepare: an agent process with four idle workers attached to a control plane, after
    # one request ran on each worker
    cp = ScriptedControlPlane(heartbeat_interval_s=0.2)
    port = cp.start()
    log_path = tmp_path / "agent.log"
    log = log_path.open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "dataplane", "agent", "--controlplane", f"127.0.0.1:{port}",
         "--workers", str(NUM_WORKERS), "--model", "tiny", "--node-id", "n3"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        cp.wait_for(lambda: cp.registers, 240, "Register")
        for index in range(NUM_WORKERS):
            cp.command(
                start_prefill=cluster_pb2.StartPrefill(
                    request_id=f"r{index}",
                    prompt_token_ids=prompt(index, 16),
                    instance_ids=[f"n3/{index}"],
                    max_new_tokens=4,
                    decode_in_place=True,
                )
            )
        for index in range(NUM_WORKERS):
            assert cp.wait_end(f"r{index}").HasField("finished")

        # Execute
        start = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        elapsed_s = time.monotonic() - start
        print(f"agent exited {code} {elapsed_s:.2f} s after SIGTERM")

        # Assert
        assert code == 0, f"agent exit code {code} after {elapsed_s:.1f} s"
        assert elapsed_s < EXIT_BOUND_S, f"agent took {elapsed_s:.1f} s to exit"
        assert "drained; exiting" in log_path.read_text()
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait()
        cp.stop()
        log.close()
        print(log_path.read_text()[-3000:])
