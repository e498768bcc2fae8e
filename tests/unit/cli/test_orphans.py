"""A LocalCluster's child dies with its parent (pecsched.orphans), on Linux."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from waiting import wait_until

from pecsched.orphans import PARENT_PID_ENV

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# The child lives until its parent dies (the scenario; 60 s bounds a leak if that breaks).
CHILD = (
    "from pecsched.orphans import die_with_parent; die_with_parent(); "
    "import time; print('armed', flush=True); time.sleep(60)"
)
# The parent starts the child as LocalCluster does (no preexec_fn), prints its pid, then lives
# until the test kills it (the scenario; 60 s bounds a leak).
PARENT = f"""
import os, subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", {CHILD!r}],
    env={{**os.environ, {PARENT_PID_ENV!r}: str(os.getpid())}},
    stdout=subprocess.PIPE, start_new_session=True,
)
assert child.stdout.readline() == b"armed\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_the_child_is_killed_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: _gone(child_pid), "the child to die with its SIGKILLed parent", 10)
    finally:
        parent.kill()


def test_a_child_whose_parent_already_exited_exits_at_once() -> None:
    # The variable names a pid that is not this child's parent: the parent it was started for
    # is gone, so the child must not run on as an orphan.
    env = {**os.environ, PARENT_PID_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, timeout=30)
    assert done.returncode == 1
    assert b"armed" not in done.stdout


def test_without_the_variable_nothing_is_armed() -> None:
    code = (
        "import os; from pecsched.orphans import die_with_parent; die_with_parent(); print('ran')"
    )
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout == b"ran\n"
