"""Dynamic communicators: process groups created on demand between the workers that need them.

There is no global default group. A group (an SP group, a prefill -> decode pair) is named by a
`GroupSpec` (a unique id plus its members in rank order). Every member calls
`GroupManager.connect(spec)`; the rendezvous goes through a shared `torch.distributed.Store`
(a `TCPStore` hosted by the agent or the control plane) under the prefix `pecsched/group/<id>/`,
and the backend (gloo for CPU tensors, NCCL for CUDA tensors) is constructed directly with the
member's rank and the group size. Groups are cached by id, destroyed when a member leaves, and
ids are single-use: a destroyed id cannot be connected again (the store still holds its keys),
so callers mint a fresh id (e.g. with an epoch) for a new group of the same members.

The group's name (`GroupSpec`), the backend choice (`make_backend_factory`) and a member's handle
on a live group (`Group`) are in `dataplane.parallel.communicator`, re-exported here.
"""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import Future

import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from dataplane.parallel.communicator import (
    BackendFactory,
    CommBackend,
    Group,
    GroupError,
    GroupSpec,
    make_backend_factory,
)

__all__ = [
    "GROUP_KEY_PREFIX",
    "BackendFactory",
    "CommBackend",
    "Group",
    "GroupError",
    "GroupManager",
    "GroupSpec",
    "connect_store",
    "make_backend_factory",
]

GROUP_KEY_PREFIX = "pecsched/group/"


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
