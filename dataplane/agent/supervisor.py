"""Worker processes: spawn, command pipes, report reader threads, death detection, respawn.

Each worker gets two one-way pipes (agent -> worker commands, worker -> agent reports) and a
reader thread here that forwards every report into the agent's inbox as `WorkerSaid`. When a
worker's report pipe reaches EOF (the process exited or was killed) the reader posts
`WorkerDied` once; the agent decides what to fail and calls `respawn`.

Sending never blocks the agent: `send` pickles the command into the worker's outbox, and a
writer thread per worker writes the outbox to the pipe in order (a worker that does not read
fills its pipe, and a blocking write would stop the agent's loop, heartbeats included). A
worker is stuck when, after its Ready, a command has waited in its outbox for longer than
`stuck_after_s` with no write to its pipe completing meanwhile (twice the group timeout: a
healthy worker reads its pipe at every iteration, and the longest step of an iteration is an
SP collective, which gives up after one group timeout), or when its outbox holds more than
MAX_OUTBOX_BYTES. A watchdog thread kills a stuck worker, so it takes the path of a dead one
(`WorkerDied`: its requests fail, retryable, and the agent respawns it). Before its Ready a
worker is loading its model, which may take minutes: commands wait for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from dataplane.worker import messages as m
from dataplane.worker.process import WorkerSpec, worker_process

STUCK_GROUP_TIMEOUTS = 2.0  # stuck_after_s in group timeouts (see the module docstring)
MAX_OUTBOX_BYTES = 64 << 20  # commands a worker may leave unread (a 4,500-token prompt: 9 KB)

log = logging.getLogger("pecsched.agent")


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


class _Outbox:
    """Pickled commands for one worker, written to its pipe in order by a thread of its own.

    `put` never blocks. The writer owns the pipe and closes it when it ends: after `close`
    once everything queued is written, or when the pipe breaks (the worker is gone; what is
    queued is dropped and later puts are refused).
    """

    def __init__(self, pipe: Connection, name: str) -> None:
        self._pipe = pipe
        self._cond = threading.Condition()
        self._items: deque[tuple[float, bytes]] = deque()  # (monotonic time put, payload)
        self._num_bytes = 0
        self._progress_s = time.monotonic()  # the last write completed (or `progressed`)
        self._open = True
        self._broken = False
        threading.Thread(target=self._write, name=name, daemon=True).start()

    def put(self, payload: bytes) -> bool:
        """Queue one pickled command; False when the outbox is closed or its pipe broke."""
        with self._cond:
            if not self._open or self._broken:
                return False
            self._items.append((time.monotonic(), payload))
            self._num_bytes += len(payload)
            self._cond.notify()
        return True

    def backlog(self, now_s: float) -> tuple[float, int]:
        """How long the oldest unwritten command has waited with no write completing
        (monotonic `now_s`), and the bytes waiting; (0.0, 0) when all is written."""
        with self._cond:
            if not self._items:
                return 0.0, 0
            return now_s - max(self._items[0][0], self._progress_s), self._num_bytes

    def progressed(self) -> None:
        """Count the worker as reading from now on (it has just become Ready)."""
        with self._cond:
            self._progress_s = time.monotonic()

    def close(self) -> None:
        """Take no more commands; the writer ends once the queued ones are written."""
        with self._cond:
            self._open = False
            self._cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._open and not self._items:
                        self._cond.wait()
                    if not self._items:
                        return
                    payload = self._items[0][1]
                try:
                    self._pipe.send_bytes(payload)  # blocks while the worker's pipe is full
                except OSError:  # the worker is gone (EPIPE)
                    with self._cond:
                        self._broken = True
                        self._items.clear()
                        self._num_bytes = 0
                    return
                with self._cond:
                    self._items.popleft()
                    self._num_bytes -= len(payload)
                    self._progress_s = time.monotonic()
        finally:
            self._pipe.close()


@dataclass(slots=True)
class _Worker:
    """One spawn of a worker slot."""

    proc: Any  # the multiprocessing Process
    outbox: _Outbox
    ready: bool = False  # it reported Ready (the watchdog watches it from then on)
    killed: bool = False  # the watchdog killed it as stuck


class WorkerSupervisor:
    """Owns the worker processes; `send` is called from the agent's main thread only.

    `stuck_after_s`: see the module docstring (default: STUCK_GROUP_TIMEOUTS group timeouts).
    """

    def __init__(
        self,
        specs: list[WorkerSpec],
        inbox: queue.Queue[Any],
        stuck_after_s: float | None = None,
    ) -> None:
        import torch.multiprocessing as tmp

        self._ctx = tmp.get_context("spawn")
        self._specs = specs
        self._inbox = inbox
        self._workers: list[_Worker | None] = [None] * len(specs)
        self._generations = [0] * len(specs)
        self._stopping = False
        if stuck_after_s is None:
            stuck_after_s = STUCK_GROUP_TIMEOUTS * max(s.group_timeout_s for s in specs)
        self.stuck_after_s = stuck_after_s
        self._halt = threading.Event()
        for index in range(len(specs)):
            self._spawn(index)
        threading.Thread(target=self._watch, name="pecsched-watchdog", daemon=True).start()

    @property
    def num_workers(self) -> int:
        """Number of worker slots."""
        return len(self._specs)

    def pid(self, index: int) -> int | None:
        """The process id of worker `index` (None before it started)."""
        worker = self._workers[index]
        return None if worker is None else int(worker.proc.pid)

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
        worker = _Worker(proc, _Outbox(cmd_send, f"pecsched-commands-{index}"))
        self._workers[index] = worker
        generation = self._generations[index]
        threading.Thread(
            target=self._read,
            args=(index, generation, rep_recv, worker),
            name=f"pecsched-reports-{index}",
            daemon=True,
        ).start()

    def _read(self, index: int, generation: int, conn: Connection, worker: _Worker) -> None:
        while True:
            try:
                report = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(report, m.Ready):
                worker.outbox.progressed()
                worker.ready = True
            self._inbox.put(WorkerSaid(index, generation, report))
        worker.proc.join(timeout=5)
        conn.close()
        self._inbox.put(WorkerDied(index, generation, worker.proc.exitcode))

    def send(self, index: int, cmd: m.WorkerCommand) -> bool:
        """Queue a command for worker `index` (never blocks); False when it is gone."""
        worker = self._workers[index]
        return worker is not None and worker.outbox.put(bytes(ForkingPickler.dumps(cmd)))

    def respawn(self, index: int) -> None:
        """Start a fresh worker in slot `index` (after its WorkerDied)."""
        if self._stopping:
            return
        worker = self._workers[index]
        if worker is not None:
            worker.outbox.close()
        self._generations[index] += 1
        self._spawn(index)

    def _watch(self) -> None:
        """Kill every stuck worker (see the module docstring), checking a few times per bound."""
        while not self._halt.wait(min(1.0, self.stuck_after_s / 4)):
            now_s = time.monotonic()
            for index, worker in enumerate(self._workers):
                if worker is None or not worker.ready or worker.killed:
                    continue
                waited_s, num_bytes = worker.outbox.backlog(now_s)
                if waited_s > self.stuck_after_s or num_bytes > MAX_OUTBOX_BYTES:
                    log.warning(
                        "worker %d left a command unread for %.1f s (%d bytes queued): "
                        "killing it as stuck",
                        index,
                        waited_s,
                        num_bytes,
                    )
                    worker.killed = True
                    worker.proc.kill()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask every worker to exit, then kill the ones still alive `timeout_s` later.

        The deadline is shared by all workers, so stopping takes at most `timeout_s` (plus the
        kills), however many workers there are. A worker exits within a fraction of a second
        of `Stop` (it skips interpreter teardown); the default leaves a stuck one killed well
        inside the 10 s that `pecsched up` gives a SIGTERMed agent.
        """
        self._stopping = True
        self._halt.set()
        workers = [w for w in self._workers if w is not None]
        for worker in workers:
            worker.outbox.put(bytes(ForkingPickler.dumps(m.Stop())))
            worker.outbox.close()  # its writer closes the pipe once Stop is written
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.proc.is_alive():
                worker.proc.kill()  # also ends a writer blocked on its full pipe
                worker.proc.join(timeout=5)
