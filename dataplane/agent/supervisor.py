"""Worker processes: spawn, command pipes, report reader threads, death detection, respawn.

Each worker gets two one-way pipes (agent -> worker commands, worker -> agent reports) and a
reader thread here that forwards every report into the agent's inbox as `WorkerSaid`. When a
worker's report pipe reaches EOF (the process exited or was killed) the reader posts
`WorkerDied` once; the agent decides what to fail and calls `respawn`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dataplane.worker import messages as m
from dataplane.worker.process import WorkerSpec, worker_process


@dataclass(frozen=True, slots=True)
class WorkerSaid:
    """A report from worker `index` (of spawn `generation`)."""

    index: int
    generation: int
    report: m.WorkerReport


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """Worker `index` (of spawn `generation`) is gone."""

    index: int
    generation: int
    exit_code: int | None


class WorkerSupervisor:
    """Owns the worker processes; `send` is called from the agent's main thread only."""

    def __init__(self, specs: list[WorkerSpec], inbox: queue.Queue[Any]) -> None:
        import torch.multiprocessing as tmp

        self._ctx = tmp.get_context("spawn")
        self._specs = specs
        self._inbox = inbox
        self._procs: list[Any] = [None] * len(specs)
        self._pipes: list[Connection | None] = [None] * len(specs)
        self._generations = [0] * len(specs)
        self._stopping = False
        for index in range(len(specs)):
            self._spawn(index)

    @property
    def num_workers(self) -> int:
        """Number of worker slots."""
        return len(self._specs)

    def pid(self, index: int) -> int | None:
        """The process id of worker `index` (None before it started)."""
        proc = self._procs[index]
        return None if proc is None else int(proc.pid)

    def generation(self, index: int) -> int:
        """How many times worker `index` was (re)spawned, minus one."""
        return self._generations[index]

    def _spawn(self, index: int) -> None:
        cmd_recv, cmd_send = self._ctx.Pipe(duplex=False)
        rep_recv, rep_send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_process,
            args=(self._specs[index], cmd_recv, rep_send),
            name=f"pecsched-worker-{index}",
            daemon=True,
        )
        proc.start()
        cmd_recv.close()  # the child holds its own copies; EOF detection needs ours closed
        rep_send.close()
        self._procs[index], self._pipes[index] = proc, cmd_send
        generation = self._generations[index]
        threading.Thread(
            target=self._read,
            args=(index, generation, rep_recv, proc),
            name=f"pecsched-reports-{index}",
            daemon=True,
        ).start()

    def _read(self, index: int, generation: int, conn: Connection, proc: Any) -> None:
        while True:
            try:
                report = conn.recv()
            except (EOFError, OSError):
                break
            self._inbox.put(WorkerSaid(index, generation, report))
        proc.join(timeout=5)
        conn.close()
        self._inbox.put(WorkerDied(index, generation, proc.exitcode))

    def send(self, index: int, cmd: m.WorkerCommand) -> bool:
        """Queue a command for worker `index`; False when its pipe is closed (worker gone)."""
        pipe = self._pipes[index]
        if pipe is None:
            return False
        try:
            pipe.send(cmd)
        except (BrokenPipeError, OSError):
            return False
        return True

    def respawn(self, index: int) -> None:
        """Start a fresh worker in slot `index` (after its WorkerDied)."""
        if self._stopping:
            return
        pipe = self._pipes[index]
        if pipe is not None:
            pipe.close()
        self._generations[index] += 1
        self._spawn(index)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask every worker to exit, then kill the ones still alive `timeout_s` later.

        The deadline is shared by all workers, so stopping takes at most `timeout_s` (plus the
        kills), however many workers there are. A worker exits within a fraction of a second
        of `Stop` (it skips interpreter teardown); the default leaves a stuck one killed well
        inside the 10 s that `pecsched up` gives a SIGTERMed agent.
        """
        self._stopping = True
        for index in range(len(self._specs)):
            self.send(index, m.Stop())
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()
