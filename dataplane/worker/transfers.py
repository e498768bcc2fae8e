"""A worker's KV transfers: started by transport, sequenced per worker pair, polled.

Transport by topology (`dataplane.parallel.topology.kv_transport`): CUDA IPC between GPU
workers of one node (each transfer independent, any number at once), else send/recv over the
pair's group (NCCL between nodes, gloo on CPU).

Pair groups are persistent: one group per (source, destination) pair, created by the first
transfer between the two and reused by every later one, never one communicator per transfer.
Its id is the `group_id` of the transfer that created it, which both sides know. Transfers of
one pair run one at a time, in the order their commands arrived: both workers receive the
commands of a pair in the control plane's order, so both post in the same order (NCCL matches
point-to-point ops by order alone, and ignores tags). A transfer that fails breaks the group:
each side destroys it, and the next transfer of the pair creates a fresh one under its own id.
(Should only one side have seen the failure, the next transfer fails at its rendezvous, after
which both sides start afresh.) A queued transfer's timeout counts from its command, queueing
included.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from dataplane.parallel.groups import Group, GroupManager, GroupSpec
from dataplane.parallel.kv_ipc import IpcKVReceiver, IpcKVSender
from dataplane.parallel.kv_transfer import KVReceiver, KVSender, TransferState

Side = KVSender | KVReceiver | IpcKVSender | IpcKVReceiver
Pair = tuple[str, str]  # (source member id, destination member id)
Key = tuple[str, str]  # (request id, transfer id)


@dataclass(slots=True)
class Transfer:
    """One side of one KV transfer, running or queued behind its pair's earlier transfers."""

    key: Key
    is_source: bool
    deadline_s: float  # monotonic; the command's timeout counts from its arrival
    started_s: float  # monotonic arrival, for duration_s
    side: Side | None = None  # None while queued
    pair: Pair | None = None  # pair-group transfers only
    group_id: str = ""  # the id the pair's group gets if this transfer creates it
    manager: GroupManager | None = None  # pair-group transfers only
    make_side: Callable[[Future[Group], float], Side] | None = None  # queued pair transfer
    announced: bool = False  # TRANSFERRING reported (sender)
    error: str = ""  # why it failed before it started

    @property
    def num_bytes(self) -> int:
        """Bytes moved so far."""
        return 0 if self.side is None else self.side.num_bytes

    def failure(self) -> str:
        """Why it failed ("" unless it did)."""
        reason = None if self.side is None else self.side.failure()
        return reason or self.error


@dataclass(slots=True)
class _PairState:
    queue: deque[Key] = field(default_factory=deque)  # transfers of the pair, head running
    group_id: str | None = None  # the live persistent group of the pair


class TransferTable:
    """Owns this worker's transfers; every method runs on the worker's single thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._transfers: dict[Key, Transfer] = {}
        self._pairs: dict[Pair, _PairState] = {}

    def __bool__(self) -> bool:
        return bool(self._transfers)

    def __contains__(self, key: Key) -> bool:
        return key in self._transfers

    def keys_of(self, request_id: str, *, sources_only: bool = False) -> list[Key]:
        """Keys of the request's transfers here (only outgoing ones if `sources_only`)."""
        return [
            k
            for k, t in self._transfers.items()
            if k[0] == request_id and (t.is_source or not sources_only)
        ]

    def pair_group_id(self, pair: Pair) -> str | None:
        """The id of the pair's live persistent group, if any."""
        state = self._pairs.get(pair)
        return None if state is None else state.group_id

    def add_ipc(self, key: Key, is_source: bool, timeout_s: float, side: Side) -> None:
        """Track a CUDA IPC transfer (already started: IPC transfers need no sequencing)."""
        now = self._clock()
        self._transfers[key] = Transfer(key, is_source, now + timeout_s, now, side=side)

    def add_pair(
        self,
        key: Key,
        is_source: bool,
        timeout_s: float,
        pair: Pair,
        group_id: str,
        manager: GroupManager,
        make_side: Callable[[Future[Group], float], Side],
    ) -> None:
        """Queue a pair-group transfer; it starts once the pair's earlier ones ended.

        `make_side(group_future, remaining_timeout_s)` builds the sender or receiver.
        """
        now = self._clock()
        self._transfers[key] = Transfer(
            key, is_source, now + timeout_s, now, None, pair, group_id, manager, make_side
        )
        self._pairs.setdefault(pair, _PairState()).queue.append(key)
        self._start_head(pair)

    def abort(self, key: Key) -> Transfer:
        """Stop and forget one transfer (a running pair transfer breaks its pair's group)."""
        transfer = self._transfers.pop(key)
        if transfer.side is not None:
            transfer.side.abort()
        self._retire(transfer, TransferState.FAILED)
        return transfer

    def poll(self) -> list[tuple[Transfer, TransferState]]:
        """Advance every running transfer; returns the ones that changed: TRANSFERRING (first
        seen, senders only) or ended (DONE / FAILED, now forgotten), in a stable order."""
        changed: list[tuple[Transfer, TransferState]] = []
        for key, transfer in list(self._transfers.items()):
            if transfer.side is None:
                if transfer.error:  # timed out in the queue
                    del self._transfers[key]
                    changed.append((transfer, TransferState.FAILED))
                continue
            state = transfer.side.poll()
            if state is TransferState.TRANSFERRING and transfer.is_source:
                if not transfer.announced:
                    transfer.announced = True
                    changed.append((transfer, state))
            elif state in (TransferState.DONE, TransferState.FAILED):
                del self._transfers[key]
                self._retire(transfer, state)
                changed.append((transfer, state))
        return changed

    def _retire(self, transfer: Transfer, state: TransferState) -> None:
        """Take an ended transfer off its pair; a failure there breaks the pair's group."""
        pair = None if transfer.pair is None else self._pairs.get(transfer.pair)
        if pair is None or transfer.pair is None or transfer.key not in pair.queue:
            return  # an IPC transfer, or one that timed out in the queue (already off it)
        was_head = pair.queue[0] == transfer.key
        pair.queue.remove(transfer.key)
        if was_head and transfer.side is not None and state is TransferState.FAILED:
            if pair.group_id is not None and transfer.manager is not None:
                transfer.manager.destroy(pair.group_id)
            pair.group_id = None
        self._start_head(transfer.pair)
        if not pair.queue and pair.group_id is None:
            del self._pairs[transfer.pair]

    def _start_head(self, pair: Pair) -> None:
        """Start the oldest queued transfer of `pair` if none of the pair is running."""
        state = self._pairs[pair]
        while state.queue:
            head = self._transfers[state.queue[0]]
            if head.side is not None or head.error:
                return
            assert head.make_side is not None and head.manager is not None
            remaining_s = head.deadline_s - self._clock()
            if remaining_s <= 0:
                head.error = "timed out waiting for the pair's earlier transfers"
                state.queue.popleft()
                continue
            group_id = state.group_id or head.group_id
            try:
                future = head.manager.connect_async(GroupSpec(group_id, pair))
            except ValueError as exc:  # e.g. the id was destroyed before
                head.error = str(exc)
                state.queue.popleft()
                continue
            state.group_id = group_id
            head.side = head.make_side(future, remaining_s)
            return
