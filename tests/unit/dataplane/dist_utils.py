"""A pool of worker processes that run jobs over real groups (multi-process tests): CPU workers
over gloo, or one worker per GPU over NCCL (`device="cuda"`).

Spawning a process that imports torch costs seconds on a 2-core machine, so tests share one
pool per module: `WorkerPool(size)` starts `size` workers once; `run(fn, ranks, *args)` forms a
fresh group (unique id) of the chosen workers through the pool's TCPStore and calls
`fn(group, manager, *args)` on each; results come back in rank order. A job function may kill
its own process (`os._exit`) to simulate a dead peer; `restart(i)` replaces a dead worker.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

GROUP_TIMEOUT_S = 60.0  # rendezvous + collectives; generous: the test machine is shared
STARTUP_TIMEOUT_S = 300.0  # importing torch in 4 processes on a loaded 2-core machine


def _worker_main(index: int, port: int, device: str, jobs: Any, results: Any) -> None:
    import torch

    from dataplane.parallel.groups import (
        GroupManager,
        GroupSpec,
        connect_store,
        make_backend_factory,
    )

    torch.set_num_threads(1)
    if device == "cuda":
        device = f"cuda:{index}"
        torch.cuda.set_device(index)
    store = connect_store("127.0.0.1", port, timeout_s=GROUP_TIMEOUT_S)
    manager = GroupManager(
        store, f"w{index}", make_backend_factory(device, "127.0.0.1"), GROUP_TIMEOUT_S
    )
    results.put(("ready", index, True, None))
    while True:
        job = jobs.get()
        if job is None:
            manager.close()
            return
        job_id, group_id, members, fn, args = job
        try:
            group = manager.connect(GroupSpec(group_id, members))
            value = fn(group, manager, *args)
            manager.destroy(group_id)
            results.put((job_id, index, True, value))
        except BaseException:  # report any failure to the parent instead of dying silently
            results.put((job_id, index, False, traceback.format_exc()))


class WorkerPool:
    """`size` spawned workers sharing one TCPStore hosted by this (test) process; with
    `device="cuda"`, worker i runs on GPU i (the caller checks there are enough)."""

    def __init__(self, size: int, device: str = "cpu") -> None:
        import torch.distributed as dist

        from dataplane.parallel.groups import connect_store

        self._ctx = mp.get_context("spawn")
        self._store: dist.TCPStore = connect_store("127.0.0.1", 0, GROUP_TIMEOUT_S, is_master=True)
        self.port = self._store.port
        self.device = device
        self._results: Any = self._ctx.Queue()
        self._jobs: list[Any] = []
        self._procs: list[Any] = []
        self._ids = itertools.count()
        self._starting: set[int] = set()
        for i in range(size):
            self._jobs.append(self._ctx.Queue())
            self._procs.append(None)
            self._start(i)
        self._wait_ready()

    def _start(self, i: int) -> None:
        proc = self._ctx.Process(
            target=_worker_main,
            args=(i, self.port, self.device, self._jobs[i], self._results),
            daemon=True,
        )
        proc.start()
        self._procs[i] = proc
        self._starting.add(i)

    def _wait_ready(self) -> None:
        """Block until every started worker has imported torch and joined the store."""
        while self._starting:
            try:
                tag, index, _, _ = self._results.get(timeout=STARTUP_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(f"workers {sorted(self._starting)} did not start") from None
            if tag == "ready":
                self._starting.discard(index)

    def is_alive(self, i: int) -> bool:
        """Whether worker i's process is running."""
        return bool(self._procs[i].is_alive())

    def restart(self, i: int) -> None:
        """Replace worker i (after a job killed it)."""
        self._procs[i].join(timeout=5)
        self._jobs[i] = self._ctx.Queue()
        self._start(i)
        self._wait_ready()

    def run(
        self,
        fn: Callable[..., Any],
        workers: Sequence[int],
        *args: Any,
        timeout_s: float = 120.0,
        expect: int | None = None,
        check: bool = True,
    ) -> list[Any]:
        """Run `fn(group, manager, *args)` on `workers` (rank = position in the list).

        Returns each rank's value; if a job raised, `check` re-raises its traceback here, else
        its slot holds a RuntimeError carrying it. `expect` = how many results to wait for (default: all; fewer when a job kills
        its own worker). Raises TimeoutError if results do not arrive in time (a hang).
        """
        job_id = next(self._ids)
        group_id = f"test-{job_id}"
        members = tuple(f"w{i}" for i in workers)
        for i in workers:
            self._jobs[i].put((job_id, group_id, members, fn, args))
        want = len(workers) if expect is None else expect
        got: dict[int, Any] = {}
        while len(got) < want:
            try:
                rid, index, ok, value = self._results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(
                    f"job {job_id}: {len(got)}/{want} results in {timeout_s}s"
                ) from None
            if rid != job_id:
                continue  # a late result of an earlier job whose peer died
            got[index] = value if ok else RuntimeError(value)
        values = [got.get(i) for i in workers]
        errors = [v for v in values if isinstance(v, RuntimeError)]
        if check and errors:
            raise errors[0]
        return values

    def close(self) -> None:
        """Stop all workers."""
        for i, proc in enumerate(self._procs):
            if proc.is_alive():
                self._jobs[i].put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


_SHARED: dict[int, WorkerPool] = {}


def shared_pool(size: int = 4) -> WorkerPool:
    """One pool per test session (spawning torch workers is the slow part); closed at exit."""
    if size not in _SHARED:
        _SHARED[size] = WorkerPool(size)
        atexit.register(_SHARED[size].close)
    return _SHARED[size]
