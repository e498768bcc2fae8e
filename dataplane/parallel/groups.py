"""Dynamic communicators: process groups created on demand between the workers that need them.

There is no global default group. A group (an SP group, a prefill -> decode pair) is named by a
`GroupSpec` (a unique id plus its members in rank order). Every member calls
`GroupManager.connect(spec)`; the rendezvous goes through a shared `torch.distributed.Store`
(a `TCPStore` hosted by the agent or the control plane) under the prefix `pecsched/group/<id>/`,
and the backend (gloo for CPU tensors, NCCL for CUDA tensors) is constructed directly with the
member's rank and the group size. Groups are cached by id, destroyed when a member leaves, and
ids are single-use: a destroyed id cannot be connected again (the store still holds its keys),
so callers mint a fresh id (e.g. with an epoch) for a new group of the same members.

Backend choice happens once, in `make_backend_factory`.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

GROUP_KEY_PREFIX = "pecsched/group/"
_CANCEL_TAG = 0x7FFF_FFF0  # a tag no transfer uses: the receive that closes a gloo pair


class CommBackend(Enum):
    """Collective backend of a group; gloo moves CPU tensors, NCCL moves CUDA tensors."""

    GLOO = "gloo"
    NCCL = "nccl"


class GroupError(RuntimeError):
    """A collective on a group failed (peer died, timeout, abort); the group is now broken."""

    def __init__(self, group_id: str, detail: str) -> None:
        super().__init__(f"group {group_id!r}: {detail}")
        self.group_id = group_id
        self.detail = detail


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Names a communicator: a unique id and the member worker ids in rank order."""

    group_id: str  # unique across the cluster's lifetime; never reused after destroy
    member_ids: tuple[str, ...]  # worker ids; index = rank in the group

    def __post_init__(self) -> None:
        if not self.group_id:
            raise ValueError("group_id must not be empty")
        if not self.member_ids:
            raise ValueError(f"member_ids of group {self.group_id!r} must not be empty")
        if len(set(self.member_ids)) != len(self.member_ids):
            raise ValueError(f"member_ids of group {self.group_id!r} repeat: {self.member_ids}")

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.member_ids)

    def rank_of(self, member_id: str) -> int:
        """Rank of `member_id`; ValueError naming the group if it is not a member."""
        try:
            return self.member_ids.index(member_id)
        except ValueError:
            raise ValueError(
                f"member_id {member_id!r} is not in group {self.group_id!r} {self.member_ids}"
            ) from None


@dataclass(frozen=True, slots=True)
class BackendFactory:
    """Builds the backend of one group member; the backend is fixed here, once."""

    backend: CommBackend  # gloo or NCCL
    device: torch.device  # where this worker's tensors live (cpu for gloo, cuda:i for NCCL)
    gloo_hostname: str  # address gloo binds and advertises ("" = resolve the hostname)

    def create(self, store: Store, rank: int, size: int, timeout_s: float) -> Any:
        """Construct the backend; blocks until all `size` members have joined or timeout."""
        timeout = dt.timedelta(seconds=timeout_s)
        if self.backend is CommBackend.GLOO:
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.gloo_hostname)]
            return dist.ProcessGroupGloo(store, rank, size, opts)
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        nccl_opts.is_high_priority_stream = False
        return dist.ProcessGroupNCCL(store, rank, size, nccl_opts)


def make_backend_factory(device: torch.device | str, gloo_hostname: str = "") -> BackendFactory:
    """The one place the backend is chosen: CUDA devices use NCCL, everything else gloo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("device is cuda but this torch build has no NCCL")
        return BackendFactory(CommBackend.NCCL, dev, gloo_hostname)
    if not dist.is_gloo_available():
        raise RuntimeError("this torch build has no gloo backend")
    return BackendFactory(CommBackend.GLOO, dev, gloo_hostname)


class Group:
    """One worker's handle on a live communicator; all calls take tensors on `device`.

    Blocking helpers (`all_to_all`, `all_gather`, `all_reduce_max`, `barrier`) wait with the
    group timeout and raise `GroupError` on failure, after which the group is broken and every
    further call raises `GroupError` at once. On NCCL they are stream-ordered instead (results
    are valid for later work on the current stream; the CPU does not wait) and failures surface
    through the communicator's watchdog. `send`/`recv` return the backend's `Work` for the
    caller to poll (`is_completed()`) or wait on.
    """

    def __init__(
        self,
        spec: GroupSpec,
        rank: int,
        backend: Any,
        factory: BackendFactory,
        timeout_s: float,
    ) -> None:
        self.spec = spec
        self.rank = rank
        self.size = spec.size
        self.device = factory.device
        self.backend_kind = factory.backend
        self.timeout_s = timeout_s
        # torch's stubs lack the c10d Backend's collective methods, hence Any.
        self._backend: Any = backend
        self._broken: str | None = None

    @property
    def group_id(self) -> str:
        """The group's id."""
        return self.spec.group_id

    @property
    def is_broken(self) -> bool:
        """True after a failure or abort; the group must be destroyed and never reused."""
        return self._broken is not None

    def _live(self) -> Any:
        if self._backend is None:
            raise GroupError(self.group_id, "used after close")
        if self._broken is not None:
            raise GroupError(self.group_id, f"broken: {self._broken}")
        return self._backend

    def _wait(self, work: dist.Work, what: str) -> None:
        """gloo: block until `work` completes or the group timeout. NCCL: order the current
        stream after `work` without blocking the CPU; the communicator's watchdog enforces the
        group timeout (given at creation). A wait with a timeout would make NCCL sleep-poll the
        CPU in 1 ms steps, idling the GPU several times per layer of an SP prefill."""
        try:
            if self.backend_kind is CommBackend.NCCL:
                work.wait()
                return
            work.wait(dt.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            self.mark_broken(f"{what} failed: {exc}")
            raise GroupError(self.group_id, f"{what} failed: {exc}") from exc

    def wait_work(self, work: dist.Work, what: str, should_stop: Callable[[], bool]) -> None:
        """Block until a point-to-point `work` completes (call from a helper thread).

        gloo: `Work.wait` with the group timeout (gloo P2P works report completion only through
        wait). NCCL: poll `is_completed()` so that `should_stop()` (an abort) is honoured.
        Raises GroupError on failure, timeout or stop.
        """
        if self.backend_kind is CommBackend.GLOO:
            self._wait(work, what)
            return
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            if should_stop() or time.monotonic() > deadline:
                self.mark_broken(f"{what} stopped or timed out")
                raise GroupError(self.group_id, f"{what} stopped or timed out")
            time.sleep(0.0005)
        self._wait(work, what)  # completed: surfaces the op's error, if any

    def mark_broken(self, reason: str) -> None:
        """Record a failure; later calls raise GroupError. The first reason is kept."""
        if self._broken is None:
            self._broken = reason

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: Sequence[int],
        in_splits: Sequence[int],
    ) -> None:
        """Uneven all-to-all along dim 0: `inp[in_splits[r]-th slice]` goes to rank r."""
        if len(out_splits) != self.size or len(in_splits) != self.size:
            raise ValueError(f"splits need {self.size} entries: {out_splits}, {in_splits}")
        work = self._live().alltoall_base(
            out, inp, list(out_splits), list(in_splits), dist.AllToAllOptions()
        )
        self._wait(work, "all_to_all")

    def all_gather(self, outs: list[torch.Tensor], inp: torch.Tensor) -> None:
        """Gather `inp` of every rank into `outs[rank]` (same shapes on all ranks)."""
        if len(outs) != self.size:
            raise ValueError(f"all_gather needs {self.size} output tensors, got {len(outs)}")
        self._wait(self._live().allgather([outs], [inp]), "all_gather")

    def all_reduce_max(self, t: torch.Tensor) -> None:
        """In-place elementwise max over the group."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX  # type: ignore[assignment]  # stub says RedOpType
        self._wait(self._live().allreduce([t], opts), "all_reduce")

    def barrier(self) -> None:
        """Wait until every member reaches the barrier (or the timeout)."""
        if self.backend_kind is CommBackend.NCCL:
            # NCCL's own barrier guesses the GPU from the rank; ours may differ: reduce on ours,
            # then wait for it on the CPU (stream-ordered waits do not).
            self.all_reduce_max(torch.zeros(1, device=self.device))
            torch.cuda.current_stream(self.device).synchronize()
            return
        self._wait(self._live().barrier(dist.BarrierOptions()), "barrier")

    def send(self, t: torch.Tensor, dst: int, tag: int = 0) -> dist.Work:
        """Start sending `t` to rank `dst`; the caller keeps `t` alive until the Work completes."""
        work: dist.Work = self._live().send([t], dst, tag)
        return work

    def recv(self, t: torch.Tensor, src: int, tag: int = 0) -> dist.Work:
        """Start receiving into `t` from rank `src`; `t` is valid only after the Work completes."""
        work: dist.Work = self._live().recv([t], src, tag)
        return work

    def send_recv(
        self, send_t: torch.Tensor, dst: int, recv_t: torch.Tensor, src: int, tag: int = 0
    ) -> None:
        """Exchange one tensor with ring neighbours: send to `dst` while receiving from `src`.

        Empty tensors are skipped, so the peers' sizes must agree (the caller knows them).
        """
        backend = self._live()
        # Empty tensors are not sent (gloo never matches a 0-byte pair); both sides know sizes.
        do_send, do_recv = send_t.numel() > 0, recv_t.numel() > 0
        if not (do_send and do_recv):
            works = [backend.recv([recv_t], src, tag)] if do_recv else []
            works += [backend.send([send_t], dst, tag)] if do_send else []
            for work in works:
                self._wait(work, "send_recv")
            return
        if self.backend_kind is CommBackend.NCCL:
            # NCCL serialises P2P ops on one stream: fuse the pair or the ring deadlocks.
            backend._start_coalescing()
            backend.recv([recv_t], src, tag)
            backend.send([send_t], dst, tag)
            self._wait(backend._end_coalescing(), "send_recv")
            return
        # gloo runs ops on their own threads; post the receive first.
        works = [backend.recv([recv_t], src, tag), backend.send([send_t], dst, tag)]
        for work in works:
            self._wait(work, "send_recv")

    def cancel(self, works: Sequence[dist.Work], peer: int | None = None) -> None:
        """Abort pending point-to-point `works` and break the group.

        NCCL: the communicator is aborted. gloo: a pending op is forced through its timeout path,
        which closes the connection so the peer's matching op fails too; with no op pending,
        a throw-away receive from `peer` is posted and timed out to close that connection.
        """
        self.mark_broken("cancelled")
        backend = self._backend
        if backend is None:
            return
        if self.backend_kind is CommBackend.NCCL:
            backend.abort()
            return
        if not works and peer is not None:
            try:
                works = [backend.recv([torch.empty(1, device=self.device)], peer, _CANCEL_TAG)]
            except RuntimeError:
                return  # the peer closed the pair already (it finished or died): nothing to do
        for work in works:
            try:
                work.wait(dt.timedelta(milliseconds=1))
            except RuntimeError:
                pass  # the expected outcome: the op timed out and the pair is now closed

    def close(self) -> None:
        """Release the backend. Idempotent; later calls raise GroupError."""
        backend, self._backend = self._backend, None
        if backend is None or self.backend_kind is not CommBackend.NCCL:
            return  # gloo frees its sockets when the last reference goes
        if self.is_broken:
            backend.abort()
        else:
            backend.shutdown()


class GroupManager:
    """Creates, caches and destroys this worker's communicators. Thread-safe.

    Args:
        store: the shared rendezvous store (a TCPStore client, or the master itself).
        member_id: this worker's id, as it appears in `GroupSpec.member_ids`.
        factory: the backend factory (from `make_backend_factory`).
        timeout_s: rendezvous and collective timeout for every group.
    """

    def __init__(
        self, store: Store, member_id: str, factory: BackendFactory, timeout_s: float
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.member_id = member_id
        self.factory = factory
        self.timeout_s = timeout_s
        self._store = store
        self._lock = threading.Lock()
        self._groups: dict[str, Group] = {}
        self._pending: dict[str, Future[Group]] = {}
        self._retired: set[str] = set()

    @property
    def store(self) -> Store:
        """The rendezvous store (also the mailbox of CUDA IPC transfers)."""
        return self._store

    def connect(self, spec: GroupSpec) -> Group:
        """The cached group for `spec`, creating it (blocking rendezvous) if needed.

        Raises:
            ValueError: this worker is not a member, the id was destroyed before, or the id is
                cached with different members.
            GroupError: the rendezvous did not complete within the timeout.
        """
        return self.connect_async(spec).result()

    def connect_async(self, spec: GroupSpec) -> Future[Group]:
        """Like `connect` but never blocks: the rendezvous runs on a background thread."""
        rank = spec.rank_of(self.member_id)
        with self._lock:
            if spec.group_id in self._retired:
                raise ValueError(f"group_id {spec.group_id!r} was destroyed; use a fresh id")
            cached = self._groups.get(spec.group_id)
            if cached is not None:
                if cached.spec != spec:
                    raise ValueError(f"group_id {spec.group_id!r} is cached as {cached.spec}")
                done: Future[Group] = Future()
                done.set_result(cached)
                return done
            pending = self._pending.get(spec.group_id)
            if pending is None:
                pending = Future()
                self._pending[spec.group_id] = pending
                # A daemon thread per rendezvous: one abandoned by `destroy` waits out the
                # timeout without holding up other rendezvous or the interpreter's exit.
                threading.Thread(
                    target=self._run_create,
                    args=(spec, rank, pending),
                    name=f"pecsched-rdzv-{spec.group_id}",
                    daemon=True,
                ).start()
            return pending

    def _run_create(self, spec: GroupSpec, rank: int, future: Future[Group]) -> None:
        try:
            group = self._create(spec, rank)
        except BaseException as exc:  # the future carries it to the caller
            future.set_exception(exc)
            return
        future.set_result(group)

    def _create(self, spec: GroupSpec, rank: int) -> Group:
        prefixed = PrefixStore(f"{GROUP_KEY_PREFIX}{spec.group_id}", self._connection())
        try:
            backend = self.factory.create(prefixed, rank, spec.size, self.timeout_s)
        except (RuntimeError, dist.DistError) as exc:
            with self._lock:
                self._pending.pop(spec.group_id, None)
                self._retired.add(spec.group_id)
            raise GroupError(spec.group_id, f"rendezvous failed: {exc}") from exc
        group = Group(spec, rank, backend, self.factory, self.timeout_s)
        with self._lock:
            self._pending.pop(spec.group_id, None)
            abandoned = spec.group_id in self._retired
            if not abandoned:
                self._groups[spec.group_id] = group
        if abandoned:  # destroyed while joining: close it, so the members that joined fail
            group.mark_broken("destroyed during its rendezvous")
            group.close()
            del group, backend  # the error's traceback must not keep the connections open
            raise GroupError(spec.group_id, "destroyed during its rendezvous")
        return group

    def _connection(self) -> Store:
        """A store connection of the group's own.

        A TCPStore client runs one operation at a time: a rendezvous that waits for a late
        peer's key holds the connection for up to the group timeout, and would hold every other
        rendezvous of this worker (and the IPC mailbox) behind it. This was the live cluster's
        stall: one transfer's rendezvous waiting 30 s delayed all the next transfers of its
        worker by as much. Each group therefore gets a connection of its own (it keeps it for
        its life: backends may use the store after the rendezvous).
        """
        if isinstance(self._store, TCPStore):
            return TCPStore(
                self._store.host,
                self._store.port,
                is_master=False,
                wait_for_workers=False,
                timeout=dt.timedelta(seconds=self.timeout_s),
            )
        return self._store

    def get(self, group_id: str) -> Group | None:
        """The cached live group with this id, or None."""
        with self._lock:
            return self._groups.get(group_id)

    def destroy(self, group_id: str) -> None:
        """Close and forget the group; its id can never be connected again. Idempotent.

        A group still in its rendezvous is abandoned: its future fails with GroupError, and
        the communicator is closed as soon as the rendezvous ends (its thread cannot be
        interrupted: it waits out the timeout when a member never joins)."""
        with self._lock:
            group = self._groups.pop(group_id, None)
            self._retired.add(group_id)
        if group is not None:
            group.close()

    def member_left(self, member_id: str) -> tuple[str, ...]:
        """Destroy every cached group that contains `member_id`; returns their ids, sorted."""
        with self._lock:
            ids = sorted(g for g, grp in self._groups.items() if member_id in grp.spec.member_ids)
        for group_id in ids:
            self.destroy(group_id)
        return tuple(ids)

    def group_ids(self) -> tuple[str, ...]:
        """Ids of the cached live groups, sorted."""
        with self._lock:
            return tuple(sorted(self._groups))

    def close(self) -> None:
        """Destroy every group (pending rendezvous are abandoned, as by `destroy`)."""
        with self._lock:
            pending = list(self._pending)
        for group_id in self.group_ids() + tuple(pending):
            self.destroy(group_id)


def connect_store(host: str, port: int, timeout_s: float, is_master: bool = False) -> TCPStore:
    """Open the rendezvous TCPStore: the master hosts it (agent or control plane), workers join."""
    return TCPStore(
        host,
        port,
        is_master=is_master,
        wait_for_workers=False,
        timeout=dt.timedelta(seconds=timeout_s),
    )
