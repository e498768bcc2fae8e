"""KV transfer between two workers of one node over CUDA IPC: a pollable state machine, no
communicator, no helper thread.

    sender                                        receiver
    expose the KV pool's storage (once per        poll: the offer arrived -> reserve_import
      worker), record an IPC event after the        (rows for the counts, request IMPORTING);
      KV's last write, set <key>/offer; then        open the sender's storage (once per peer
      pack the token ids, set <key>/ids             storage), wait for the event, copy every
    poll: <key>/result                              layer's K and V into the rows (side stream)
      "ok"    -> DONE (the caller frees the rows) poll: the ids arrived -> attach_import
      "fail:" -> FAILED                           poll: copy finished -> compare_set(result, ok)
    timeout / abort: compare_set(result, abort)       won -> finish_import -> DONE
      lost to "ok" -> DONE                            lost (abort) -> cancel import -> FAILED

The states and their meaning are those of `kv_transfer.TransferState`. `<key>/result` is the
single commit point, set once with `compare_set`: the receiver writes "ok" only after its copy
completed, so the sender may free its rows as soon as it reads "ok", and a sender that gave up
(timeout, abort) cannot be overruled by a late receiver, nor the other way round. No decode ever
sees partial KV (the request stays IMPORTING until "ok" is committed); a failed receiver frees
its rows once its copy has drained. Each side adds 1 to `<key>/ends` when it is terminal; the
second one deletes the transfer's keys.

The offer is JSON (no pickle: it crosses processes): the CUDA IPC handle of each storage the
KV lives in (`UntypedStorage._share_cuda_`, taken once per storage and cached), each layer's
view as (storage, offset, shape, strides), the IPC event and the metadata with its token ids
replaced by their counts (`metadata_header`). The ids follow as packed uint32 in `<key>/ids`:
packing and unpacking 128K of them (the Python ints) takes a few ms on each side, half the 16 GiB
copy, so the sender packs them while the receiver reserves rows and copies, and the receiver
decodes them while the GPU copies (as JSON inside the offer they cost ~25 ms before the copy
could start). Opened storages are cached by handle for
the life of the worker, so only the first transfer from a peer pays for mapping its pool.
Workers of one node see the same device numbering; a copy between two GPUs of a node goes over
their peer link. `stamps` holds each side's phase times and `copy_gpu_s` the receiver's copy as
the GPU timed it, for diagnosis (`bench/kv_ipc.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from dataplane.engine.types import KVExport, KVMetadata
from dataplane.parallel.kv_transfer import TransferState
from dataplane.parallel.kv_wire import (
    metadata_from_header,
    metadata_header,
    token_ids_to_bytes,
    with_token_ids,
)

IPC_KEY_PREFIX = "kvipc/"
_OK = "ok"
_ABORT = "abort: "
_FAIL = "fail: "


class IpcRegistry:
    """One worker's CUDA IPC state: its exposed storages and the peers' storages it opened.

    Exposing replaces the storage's data pointer with torch's reference-counted IPC one; the
    memory stays where it is. Both caches live as long as the worker (the KV pool never moves).
    """

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC needs a CUDA device, got {device}")
        self.device = device
        self._exposed: dict[int, list[Any]] = {}  # data_ptr -> encoded _share_cuda_ tuple
        self._opened: dict[str, torch.Tensor] = {}  # handle hex -> uint8 view of the storage
        self._copy_stream: torch.cuda.Stream | None = None

    @property
    def copy_stream(self) -> torch.cuda.Stream:
        """The side stream receivers copy on (engine kernels keep running meanwhile)."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return self._copy_stream

    def expose(self, storage: torch.UntypedStorage) -> list[Any]:
        """The JSON-able IPC description of `storage` (taken once per storage)."""
        key = storage.data_ptr()
        if key not in self._exposed:
            shared = storage._share_cuda_()  # type: ignore[no-untyped-call]
            self._exposed[key] = [_encode(v) for v in shared]
        return self._exposed[key]

    def open(self, described: list[Any]) -> torch.Tensor:
        """A uint8 tensor over a peer's exposed storage (mapped once per handle)."""
        args = [_decode(v) for v in described]
        handle = args[1].hex()
        base = self._opened.get(handle)
        if base is None:
            storage = torch.UntypedStorage._new_shared_cuda(*args)
            base = torch.empty(0, dtype=torch.uint8, device=storage.device)
            base.set_(storage, 0, (storage.nbytes(),), (1,))  # (nbytes,) bytes of the peer pool
            self._opened[handle] = base
        return base

    def opened(self) -> tuple[torch.Tensor, ...]:
        """The peers' storages mapped so far (uint8 views), oldest first."""
        return tuple(self._opened.values())


def _encode(value: Any) -> Any:
    return {"hex": value.hex()} if isinstance(value, bytes) else value


def _decode(value: Any) -> Any:
    return bytes.fromhex(value["hex"]) if isinstance(value, dict) else value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class _IpcSide:
    """What both sides share: the store keys, the deadline and the terminal bookkeeping."""

    def __init__(self, store: Any, key: str, timeout_s: float, clock: Callable[[], float]) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._store = store
        self._key = f"{IPC_KEY_PREFIX}{key}"
        self.timeout_s = timeout_s
        self._clock = clock
        self.stamps: dict[str, float] = {"start": clock()}  # phase -> clock, for diagnosis
        self._deadline = self.stamps["start"] + timeout_s
        self.state = TransferState.PENDING
        self._failure: str | None = None
        self.num_layers_done = 0
        self.num_bytes = 0

    def failure(self) -> str | None:
        """Why the transfer failed, or None."""
        return self._failure

    def _has(self, name: str) -> bool:
        return bool(self._store.check([f"{self._key}/{name}"]))

    def _get_bytes(self, name: str) -> bytes:
        return bytes(self._store.get(f"{self._key}/{name}"))

    def _get(self, name: str) -> str:
        return self._get_bytes(name).decode()

    def _is_terminal(self) -> bool:
        return self.state in (TransferState.DONE, TransferState.FAILED)

    def _commit(self, outcome: str) -> str:
        """Set the result unless it is set already; returns the result that holds."""
        raw = self._store.compare_set(f"{self._key}/result", "", outcome)
        return bytes(raw).decode()

    def _end(self, state: TransferState, failure: str | None = None) -> None:
        self.state, self._failure = state, failure
        self.stamps["end"] = self._clock()
        if int(self._store.add(f"{self._key}/ends", 1)) >= 2:  # the other side ended first
            for name in ("offer", "ids", "result", "ends"):
                self._store.delete_key(f"{self._key}/{name}")


class IpcKVSender(_IpcSide):
    """Offers one request's exported KV to the receiver of `key`; see the module docstring.

    Args:
        store: the node's rendezvous store (a TCPStore client).
        key: the transfer's key, the same on both sides (e.g. the transfer id).
        export: `Engine.export_kv(...)`; its rows must stay valid until DONE or FAILED.
        registry: this worker's `IpcRegistry`.
        timeout_s: the whole transfer must finish within this, counted from construction.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        store: Any,
        key: str,
        export: KVExport,
        registry: IpcRegistry,
        *,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(store, key, timeout_s, clock)
        self.export = export
        tensors = export.keys + export.values
        storages: list[list[Any]] = []
        index_of: dict[int, int] = {}
        views: list[list[Any]] = []  # [storage index, offset, shape, strides] in elements
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in index_of:
                index_of[storage.data_ptr()] = len(storages)
                storages.append(registry.expose(storage))
            index = index_of[storage.data_ptr()]
            views.append([index, t.storage_offset(), list(t.shape), list(t.stride())])
        # Orders the receiver's copy after the KV's last write on this worker's stream.
        self._event = torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]
        self._event.record(torch.cuda.current_stream(registry.device))
        offer = {
            "metadata": metadata_header(export.metadata),
            "storages": storages,
            "views": views,
            "event": self._event.ipc_handle().hex(),  # type: ignore[no-untyped-call]
        }
        self._num_bytes = sum(t.numel() * t.element_size() for t in tensors)
        store.set(f"{self._key}/offer", json.dumps(offer))
        self.stamps["offer_set"] = clock()
        self.state = TransferState.TRANSFERRING
        try:  # the receiver reserves rows and starts copying meanwhile
            ids = token_ids_to_bytes(export.metadata)
        except ValueError as exc:  # the receiver learns from the result
            self._settle(self._commit(f"{_FAIL}{exc}"))
            return
        store.set(f"{self._key}/ids", ids)
        self.stamps["ids_set"] = clock()

    def poll(self) -> TransferState:
        """Advance without blocking and return the state (terminal states are sticky)."""
        if self.state is not TransferState.TRANSFERRING:
            return self.state
        if self._has("result"):
            self._settle(self._get("result"))
        elif self._clock() > self._deadline:
            self._settle(self._commit(f"{_ABORT}timed out after {self.timeout_s}s"))
        return self.state

    def abort(self) -> None:
        """Give up (the request was cancelled): FAILED, whether or not the KV had landed."""
        if self.state is TransferState.TRANSFERRING:
            result = self._commit(f"{_ABORT}aborted by the sender")
            self._end(TransferState.FAILED, "aborted" if result == _OK else result)

    def _settle(self, result: str) -> None:
        if result == _OK:
            self.num_bytes, self.num_layers_done = self._num_bytes, len(self.export.keys)
            self._end(TransferState.DONE)
        else:
            self._end(TransferState.FAILED, result)


class IpcKVReceiver(_IpcSide):
    """Copies one request's KV from the sender of `key` into rows the engine reserves.

    Args:
        store, key, timeout_s, clock: as for `IpcKVSender`.
        registry: this worker's `IpcRegistry`.
        reserve_import: `Engine.reserve_import(metadata, #prompt ids, #output ids)`: reserves
            rows for the metadata whose token ids are not there yet, returns views.
        attach_import: `Engine.attach_import`: the metadata with its token ids.
        finish_import: `Engine.finish_import`: called once, after "ok" is committed.
        cancel_import: `Engine.cancel`: frees the rows if the transfer fails.
    """

    def __init__(
        self,
        store: Any,
        key: str,
        registry: IpcRegistry,
        reserve_import: Callable[[KVMetadata, int, int], Any],
        attach_import: Callable[[KVMetadata], None],
        finish_import: Callable[[str], None],
        cancel_import: Callable[[str], object],
        *,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(store, key, timeout_s, clock)
        self._registry = registry
        self._reserve, self._attach = reserve_import, attach_import
        self._finish, self._cancel = finish_import, cancel_import
        self.metadata: KVMetadata | None = None  # token ids empty until attached
        self._id_counts: tuple[int, int] | None = None  # (prompt, output) while not attached
        self._request_id: str | None = None  # set once rows are reserved
        self._copy_started: torch.cuda.Event | None = None  # recorded before the first copy
        self._copied: torch.cuda.Event | None = None  # recorded after the last copy
        self._sources: list[torch.Tensor] = []  # peer views, alive until the copy finished

    @property
    def request_id(self) -> str | None:
        """The incoming request's id, known once the offer has arrived."""
        return None if self.metadata is None else self.metadata.request_id

    def poll(self) -> TransferState:
        """Advance without blocking and return the state (terminal states are sticky)."""
        if self.state in (TransferState.DONE, TransferState.FAILED):
            return self.state
        try:
            if self._copied is None:
                if self._has("result"):  # the sender gave up before we started
                    self._fail(self._get("result"), commit=False)
                elif self._has("offer"):
                    self._start_copy(json.loads(self._get("offer")))
            elif self._id_counts is not None:  # copying; the token ids come meanwhile
                if self._has("ids"):
                    self._attach_ids(self._get_bytes("ids"))
                elif self._has("result"):  # the sender failed to pack them, or gave up
                    self._fail(self._get("result"), commit=False)
            elif self._copied.query():  # type: ignore[no-untyped-call]
                self.stamps["copy_done"] = self._clock()
                self._sources.clear()
                result = self._commit(_OK)
                self.stamps["committed"] = self._clock()
                if result == _OK:
                    assert self._request_id is not None
                    self._finish(self._request_id)  # only now may the engine decode it
                    self._end(TransferState.DONE)
                else:
                    self._fail(result, commit=False)
            if not self._is_terminal() and self._clock() > self._deadline:
                self._fail(f"{_ABORT}timed out after {self.timeout_s}s")
        except Exception as exc:  # e.g. the engine refused the import, or a bad offer
            self._fail(f"{_FAIL}{type(exc).__name__}: {exc}")
        return self.state

    def abort(self) -> None:
        """Cancel (e.g. the request was cancelled here): FAILED, rows freed."""
        if self.state not in (TransferState.DONE, TransferState.FAILED):
            self._fail(f"{_ABORT}aborted by the receiver")

    @property
    def copy_gpu_s(self) -> float | None:
        """The copy's duration on the GPU (after the waits), once it finished."""
        if self._copy_started is None or self._copied is None or "copy_done" not in self.stamps:
            return None
        return float(self._copy_started.elapsed_time(self._copied)) / 1e3

    def _start_copy(self, offer: dict[str, Any]) -> None:
        self.stamps["offer_read"] = self._clock()
        meta, num_prompt, num_output = metadata_from_header(offer["metadata"])
        self.metadata = meta
        target = self._reserve(meta, num_prompt, num_output)  # the request is IMPORTING
        self._id_counts = (num_prompt, num_output)
        self.stamps["rows_reserved"] = self._clock()
        self._request_id = target.request_id
        dtype = _dtype(meta.dtype)
        bases = [self._registry.open(d).view(dtype) for d in offer["storages"]]
        self._sources = [
            torch.as_strided(bases[i], shape, stride, offset)
            for i, offset, shape, stride in offer["views"]
        ]
        dests = list(target.keys + target.values)
        if len(dests) != len(self._sources):
            raise ValueError(f"offer has {len(self._sources)} tensors, rows {len(dests)}")
        event = torch.cuda.Event.from_ipc_handle(  # type: ignore[no-untyped-call]
            self._registry.device, bytes.fromhex(offer["event"])
        )
        stream = self._registry.copy_stream
        stream.wait_event(event)  # the sender's KV writes are done
        stream.wait_stream(torch.cuda.current_stream(self._registry.device))  # rows now free
        self._copy_started = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self._copied = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self._copy_started.record(stream)
        with torch.cuda.stream(stream):
            for dst, src in zip(dests, self._sources, strict=True):
                dst.copy_(src, non_blocking=True)
        self._copied.record(stream)
        self.stamps["copy_enqueued"] = self._clock()
        self.num_bytes = sum(t.numel() * t.element_size() for t in dests)
        self.num_layers_done = meta.num_layers
        self.state = TransferState.TRANSFERRING

    def _attach_ids(self, raw: bytes) -> None:
        assert self.metadata is not None and self._id_counts is not None
        self.stamps["ids_read"] = self._clock()
        meta = with_token_ids(self.metadata, *self._id_counts, raw)
        self._attach(meta)
        self.metadata, self._id_counts = meta, None
        self.stamps["ids_attached"] = self._clock()

    def _fail(self, reason: str, *, commit: bool = True) -> None:
        if commit:
            result = self._commit(reason)
            assert result != _OK, "only this side commits ok"
            reason = result
        if self._copied is not None:
            self._copied.synchronize()  # no copy may still write into rows we free
        self._sources.clear()
        if self._request_id is not None:
            self._cancel(self._request_id)
        self.num_layers_done = 0
        self._end(TransferState.FAILED, reason)
