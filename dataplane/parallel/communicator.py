"""One member's side of a communicator: its name, its backend, and the calls it runs.

`GroupSpec` names a group (a unique id and its members in rank order). `make_backend_factory` is
the one place the backend is chosen (gloo for CPU tensors, NCCL for CUDA tensors); its
`BackendFactory.create` builds one member's backend on a rendezvous store. `Group` wraps that
backend: collectives and point-to-point calls on tensors of the group's device, with one failure
rule: an op that fails (peer died, timeout, abort) raises `GroupError` and breaks the group, after
which every call raises `GroupError` at once. Nothing here rendezvous, caches or retires groups:
that is `dataplane.parallel.groups.GroupManager`, which builds every `Group`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

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
