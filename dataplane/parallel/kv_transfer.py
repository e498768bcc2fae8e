"""KV transfer between two workers over their pair group: a pollable, non-blocking state machine.

    PENDING ──(group ready, first ops posted)──▶ TRANSFERRING ──(all layers landed)──▶ DONE
       │                                              │
       └────────(peer died / timeout / abort)─────────┴──────────────────────────────▶ FAILED

The states mirror `TransferState` in protos/pecsched/v1/common.proto. `poll()` never blocks:
the blocking waits on point-to-point ops run on one helper thread per transfer (gloo P2P works
report completion only through `wait()`), while everything that touches the engine
(`begin_import`, `finish_import`, `cancel`) runs inside `poll()`, on the caller's thread, so the
engine needs no locks. The agent loop calls `poll()` between engine steps.

Wire order on the pair (the receiver posts the same order):
    1. int64[1]    length of the encoded metadata
    2. uint8[len]  `KVMetadata` (`metadata_to_bytes` of `kv_wire`: prompt, output, sampling, layout)
    3. per layer l = 0..L-1: keys[l], values[l], each (num_kv_tokens, Hkv, D) in the KV dtype
Up to `WINDOW_LAYERS` layers are in flight; `num_layers_done` reports progress.

The receiver reserves rows with `Engine.begin_import` and receives straight into them; the
request stays IMPORTING (never scheduled) until every layer has landed and `finish_import`
runs, so no decode ever sees partial KV. On failure it cancels the import, freeing the rows.
On timeout or abort the pending op is cancelled (gloo: its pair is closed, so the peer fails
too; NCCL: the communicator is aborted) and the pair group is broken: the caller destroys it
(`GroupManager.destroy`) and the next transfer uses a fresh group id. Rows are freed only after
the helper thread has stopped writing into them.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist

from dataplane.engine.types import KVExport, KVMetadata
from dataplane.parallel.groups import Group
from dataplane.parallel.kv_wire import (
    metadata_from_bytes,
    metadata_from_header,
    metadata_header,
    metadata_to_bytes,
    token_ids_to_bytes,
    with_token_ids,
)

__all__ = [
    "WINDOW_LAYERS",
    "KVReceiver",
    "KVSender",
    "TransferState",
    "metadata_from_bytes",
    "metadata_from_header",
    "metadata_header",
    "metadata_to_bytes",
    "token_ids_to_bytes",
    "with_token_ids",
]

WINDOW_LAYERS = 4  # layers posted ahead of the one being waited on


class TransferState(Enum):
    """Progress of one transfer; values equal `TransferState` in common.proto."""

    PENDING = 1  # waiting for the pair group or the metadata
    TRANSFERRING = 2  # layers in flight
    DONE = 3  # every layer landed (receiver: the request is importable/decodable)
    FAILED = 4  # see `failure()`; memory already released


class _Transfer(ABC):
    """Shared machinery: the helper thread, cancellable ops, deadline, failure bookkeeping."""

    def __init__(
        self,
        group: Group | Future[Group],
        peer_rank: int,
        tag: int,
        timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(group, Group):
            ready: Future[Group] = Future()
            ready.set_result(group)
            group = ready
        self._group_future = group
        self._group: Group | None = None
        self.peer_rank = peer_rank
        self.tag = tag
        self.timeout_s = timeout_s
        self._clock = clock
        self._deadline = clock() + timeout_s
        self.state = TransferState.PENDING
        self._failure: str | None = None
        self.num_layers_done = 0  # layers whose K and V have both completed
        self.num_bytes = 0  # bytes moved so far
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: list[dist.Work] = []  # ops posted by the helper thread, not yet done
        self._started = threading.Event()  # the first op was posted
        self._thread_error: str | None = None
        self._thread_ok = False  # set only when the protocol finished without error
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._thread.start()

    def failure(self) -> str | None:
        """Why the transfer failed, or None."""
        return self._failure

    # ------------------------------------------------------------ helper thread
    def _thread_main(self) -> None:
        try:
            self._group = self._await_group()
            self._run(self._group)
        except FutureTimeout:
            self._thread_error = "pair group rendezvous did not finish in time"
        except Exception as exc:  # any error of the peer or backend fails this transfer
            self._thread_error = f"{type(exc).__name__}: {exc}"
        else:
            self._thread_ok = True

    def _await_group(self) -> Group:
        """The pair group once its rendezvous is done; stops early on abort (no 1 s join)."""
        while True:
            try:
                return self._group_future.result(timeout=0.05)
            except FutureTimeout:
                if self._stop.is_set():
                    raise RuntimeError("stopped") from None
                if self._clock() > self._deadline:
                    raise

    def _post(self, post: Callable[..., dist.Work], t: torch.Tensor) -> dist.Work:
        """Post one send/recv (refused once stopped, so `_fail` sees every posted op)."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("stopped")
            work = post(t, self.peer_rank, self.tag)
            self._pending.append(work)
        self._started.set()
        return work

    def _complete(self, group: Group, work: dist.Work, t: torch.Tensor) -> None:
        """Block until a posted op completes; cancellable by `_fail`."""
        group.wait_work(work, "kv transfer", self._stop.is_set)
        with self._lock:
            self._pending.remove(work)
        self.num_bytes += t.numel() * t.element_size()

    def _op(self, group: Group, post: Callable[..., dist.Work], t: torch.Tensor) -> None:
        self._complete(group, self._post(post, t), t)

    def _layers(self, group: Group, pairs: Any, post: Callable[..., dist.Work]) -> None:
        """Stream (k, v) pairs with up to WINDOW_LAYERS layers in flight (no per-op round trip)."""
        in_flight: deque[list[tuple[dist.Work, torch.Tensor]]] = deque()
        for k, v in pairs:
            in_flight.append([(self._post(post, k), k), (self._post(post, v), v)])
            while len(in_flight) > WINDOW_LAYERS:
                self._complete_layer(group, in_flight.popleft())
        while in_flight:
            self._complete_layer(group, in_flight.popleft())

    def _complete_layer(self, group: Group, ops: list[tuple[dist.Work, torch.Tensor]]) -> None:
        for work, t in ops:  # the tensors stay referenced until their op completed
            self._complete(group, work, t)
        self.num_layers_done += 1

    @abstractmethod
    def _run(self, group: Group) -> None:
        """The blocking protocol, on the helper thread."""

    # ------------------------------------------------------------ caller's thread
    def poll(self) -> TransferState:
        """Advance without blocking and return the state (terminal states are sticky)."""
        if self.state is TransferState.FAILED:
            self._release_if_stopped()
        if self.state in (TransferState.DONE, TransferState.FAILED):
            return self.state
        if self._thread_error is not None:
            self._fail(self._thread_error)
        elif self._clock() > self._deadline:
            self._fail(f"timed out after {self.timeout_s}s")
        else:
            try:
                self._on_poll()
            except Exception as exc:  # e.g. the engine refused the import
                self._fail(f"{type(exc).__name__}: {exc}")
        return self.state

    def abort(self) -> None:
        """Cancel (e.g. the request was cancelled): the pending op stops, state becomes FAILED."""
        if self.state not in (TransferState.DONE, TransferState.FAILED):
            self._fail("aborted")

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self.state = TransferState.FAILED
        with self._lock:
            self._stop.set()
            pending = list(self._pending)
        if self._group is not None:
            self._group.cancel(pending, self.peer_rank)  # the peer fails fast too
        self._thread.join(timeout=1.0)  # a cancelled op returns at once
        self._release_if_stopped()

    def _release_if_stopped(self) -> None:
        if not self._thread.is_alive():
            self._release()

    @abstractmethod
    def _on_poll(self) -> None:
        """Caller-thread progress: engine calls and state changes."""

    @abstractmethod
    def _release(self) -> None:
        """Free what a failed transfer holds (called once the helper thread has stopped)."""


class KVSender(_Transfer):
    """Streams one request's exported KV to `peer_rank` of the pair group.

    Args:
        group: the pair group, or a future of it (`GroupManager.connect_async`).
        peer_rank: the receiver's rank in that group.
        export: `Engine.export_kv(...)`; its tensors must stay valid until DONE or FAILED
            (keep the request HELD on the prefill engine and cancel it afterwards).
        tag: distinguishes concurrent transfers on one gloo pair (both sides use the same);
            NCCL ignores tags, so transfers on one NCCL pair must run one at a time.
        timeout_s: the whole transfer must finish within this, counted from construction.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        group: Group | Future[Group],
        peer_rank: int,
        export: KVExport,
        *,
        tag: int = 0,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.export = export
        super().__init__(group, peer_rank, tag, timeout_s, clock)

    def _run(self, group: Group) -> None:
        raw = torch.frombuffer(
            bytearray(metadata_to_bytes(self.export.metadata)), dtype=torch.uint8
        )
        header = torch.tensor([raw.numel()], dtype=torch.int64)
        self._op(group, group.send, header.to(group.device))
        self._op(group, group.send, raw.to(group.device))
        pairs = (
            (k.contiguous(), v.contiguous())
            for k, v in zip(self.export.keys, self.export.values, strict=True)
        )
        self._layers(group, pairs, group.send)

    def _on_poll(self) -> None:
        if self._thread_ok:
            self.state = TransferState.DONE
        elif self._started.is_set():
            self.state = TransferState.TRANSFERRING

    def _release(self) -> None:
        """Nothing to free: the export's rows belong to the prefill engine."""


class KVReceiver(_Transfer):
    """Receives one request's KV from `peer_rank` straight into rows the engine reserves.

    Args:
        group: the pair group, or a future of it.
        peer_rank: the sender's rank in that group.
        begin_import: `Engine.begin_import`: reserves rows for the metadata, returns views.
        finish_import: `Engine.finish_import`: called once, after every layer has landed.
        cancel_import: `Engine.cancel`: frees the rows if the transfer fails.
        tag, timeout_s, clock: as for `KVSender`.
    """

    def __init__(
        self,
        group: Group | Future[Group],
        peer_rank: int,
        begin_import: Callable[[KVMetadata], Any],
        finish_import: Callable[[str], None],
        cancel_import: Callable[[str], object],
        *,
        tag: int = 0,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._begin, self._finish, self._cancel = begin_import, finish_import, cancel_import
        self.metadata: KVMetadata | None = None  # set by the helper thread when it arrives
        self._target: Any = None  # KVImportTarget, set by poll() once rows are reserved
        self._target_ready = threading.Event()
        super().__init__(group, peer_rank, tag, timeout_s, clock)

    @property
    def request_id(self) -> str | None:
        """The incoming request's id, known once the metadata has arrived."""
        return None if self.metadata is None else self.metadata.request_id

    def _run(self, group: Group) -> None:
        header = torch.zeros(1, dtype=torch.int64, device=group.device)
        self._op(group, group.recv, header)
        raw = torch.empty(int(header.item()), dtype=torch.uint8, device=group.device)
        self._op(group, group.recv, raw)
        self.metadata = metadata_from_bytes(raw.cpu().numpy().tobytes())
        # poll() reserves the rows on the caller's thread; wait for it (or for a stop).
        while not self._target_ready.wait(timeout=0.01):
            if self._stop.is_set():
                raise RuntimeError("stopped")
        target = self._target
        self._layers(group, zip(target.keys, target.values, strict=True), group.recv)

    def _on_poll(self) -> None:
        if self.metadata is not None and self._target is None:
            self._target = self._begin(self.metadata)  # reserves rows; request is IMPORTING
            self._target_ready.set()
            self.state = TransferState.TRANSFERRING
        if self._thread_ok and self._target is not None:
            self._finish(self._target.request_id)  # only now may the engine decode it
            self.state = TransferState.DONE

    def _release(self) -> None:
        if self._target is not None:
            target, self._target = self._target, None
            self._cancel(target.request_id)
