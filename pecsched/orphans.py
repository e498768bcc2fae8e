"""Children of a `LocalCluster` die with the process that started them.

The parent sets `PARENT_PID_ENV` in the child's environment; the child calls
`die_with_parent()` first thing, so the kernel SIGKILLs it when that parent exits (Linux
`PR_SET_PDEATHSIG`). Doing this in the child instead of in a `preexec_fn` keeps Python code out
of the window between fork and exec: with gRPC threads running in the parent, a child that runs
Python there can abort before it execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "PECSCHED_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent exits


def die_with_parent() -> None:
    """When `PARENT_PID_ENV` names this process's parent, have the kernel SIGKILL this process
    when that parent exits, and exit at once if it already has. The variable is removed from
    the environment, so this process's own children are not bound by it."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent or sys.platform != "linux":
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != parent:
        os._exit(1)  # the parent exited before the death signal was armed
