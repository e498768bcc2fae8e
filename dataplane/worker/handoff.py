"""A worker's KV hand-offs: its side of each transfer started from a command, polled, reported.

`KVHandoffs.start` begins one side of a transfer for a SendKv or RecvKv (CUDA IPC between GPU
workers of one node, else the pair's group: `dataplane.worker.transfers`). A sender first aborts
the request's older sends, pauses a DECODING request (its KV must not change while it is sent)
and exports its KV; it refuses a request whose prefill is not finished. A receiver supersedes the
request's older transfers (the control plane gave up on them), refuses a request already resident,
and checks that the incoming KV is for its request; the imported request is held (PAUSED) until
StartDecode, unless that came first (`Tracked.decode_requested`). Refusals raise `EngineError`.

`poll` reports every transfer's progress as KvTransferUpdate (transferring, done, failed). When a
send is done the source drops the request (the destination holds the KV now); when a receive
fails the receiver has freed its partial import, and the request is no longer tracked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState
from dataplane.engine.types import KVMetadata
from dataplane.parallel.groups import Group, GroupManager
from dataplane.parallel.kv_ipc import IpcKVReceiver, IpcKVSender, IpcRegistry
from dataplane.parallel.kv_transfer import KVReceiver, KVSender, TransferState
from dataplane.parallel.topology import KVTransport, kv_transport
from dataplane.worker import messages as m
from dataplane.worker.tracking import Tracked, is_resident
from dataplane.worker.transfers import Key, Transfer, TransferTable


class KVHandoffs:
    """This worker's KV transfers; every method runs on the worker's single thread.

    Args:
        engine: this worker's engine.
        member_id: this worker's instance id (its member id in groups).
        managers: store address -> the GroupManager rendezvousing through that store.
        ipc: this worker's CUDA IPC registry (CUDA workers only; None elsewhere).
        tracked: the worker's per-request bookkeeping (shared with `WorkerRuntime`).
        reports: the worker's report list (shared), where transfer updates are appended.
    """

    def __init__(
        self,
        engine: Engine,
        member_id: str,
        managers: Callable[[str], GroupManager],
        ipc: IpcRegistry | None,
        tracked: dict[str, Tracked],
        reports: list[m.WorkerReport],
    ) -> None:
        self.engine = engine
        self.member_id = member_id
        self._managers = managers
        self._ipc = ipc
        self._tracked = tracked
        self._reports = reports
        self._transfers = TransferTable()

    def __bool__(self) -> bool:
        """Whether any transfer is live (running or queued)."""
        return bool(self._transfers)

    def pending(self, request_id: str) -> bool:
        """Whether the request has a live transfer."""
        return bool(self._transfers.keys_of(request_id))

    def abort_all(self, request_id: str) -> None:
        """Abort every transfer of the request, silently (a receiver frees its partial import)."""
        for key in self._transfers.keys_of(request_id):
            self._transfers.abort(key)

    def abort_sends(self, request_id: str) -> None:
        """Abort the request's outgoing KV transfers, silently (the control plane no longer
        tracks them): one that completed later would free the KV this worker uses again."""
        for key in self._transfers.keys_of(request_id, sources_only=True):
            self._transfers.abort(key)

    def start(self, cmd: m.SendKv | m.RecvKv) -> None:
        """Start this side of the transfer of `cmd` (see the module docstring)."""
        key = (cmd.request_id, cmd.transfer_id)
        if key in self._transfers:
            raise EngineError(EngineErrorCode.INVALID_STATE, f"transfer {cmd.transfer_id!r} exists")
        manager = self._managers(cmd.store_address)
        ipc = self._ipc_for(cmd.same_node)
        if isinstance(cmd, m.SendKv):
            self._start_send(cmd, key, manager, ipc)
        else:
            self._start_receive(cmd, key, manager, ipc)

    def poll(self) -> None:
        """Poll every transfer and report its progress (see the module docstring)."""
        for transfer, state in self._transfers.poll():
            if state is TransferState.TRANSFERRING:
                self._transfer_report(transfer, "transferring")
            else:
                self._transfer_finished(transfer, state)

    def _ipc_for(self, same_node: bool) -> IpcRegistry | None:
        """This worker's IPC registry when the pair's transport is CUDA IPC, else None."""
        if kv_transport(self.engine.device.type, same_node) is not KVTransport.CUDA_IPC:
            return None
        if self._ipc is None:
            raise EngineError(EngineErrorCode.INVALID_STATE, "CUDA IPC needs a CUDA worker")
        return self._ipc

    def _start_send(
        self, cmd: m.SendKv, key: Key, manager: GroupManager, ipc: IpcRegistry | None
    ) -> None:
        rid, timeout_s = cmd.request_id, cmd.timeout_s
        self.abort_sends(rid)  # the control plane gave up on them
        state = self.engine.request_state(rid)
        if state is RequestState.DECODING:
            self.engine.pause(rid)  # KV must not change while it is sent
        elif state not in (RequestState.HELD, RequestState.PAUSED):
            raise EngineError(
                EngineErrorCode.INVALID_STATE,
                f"request {rid!r} is {state.name}: its prefill is not finished",
            )
        export = self.engine.export_kv(rid)
        if ipc is not None:
            sender = IpcKVSender(manager.store, cmd.transfer_id, export, ipc, timeout_s=timeout_s)
            self._transfers.add_ipc(key, True, timeout_s, sender)
            return

        def make_sender(group: Future[Group], remaining_s: float) -> KVSender:
            return KVSender(group, 1, export, timeout_s=remaining_s)

        pair = (self.member_id, cmd.peer_member_id)
        self._transfers.add_pair(key, True, timeout_s, pair, cmd.group_id, manager, make_sender)

    def _start_receive(
        self, cmd: m.RecvKv, key: Key, manager: GroupManager, ipc: IpcRegistry | None
    ) -> None:
        rid, timeout_s = cmd.request_id, cmd.timeout_s
        # A newer receive supersedes older ones: the control plane gave up on those (a late
        # failure of one must not be reported against the request this one delivers).
        self.abort_all(rid)
        if is_resident(self.engine, rid):
            raise EngineError(EngineErrorCode.INVALID_STATE, f"request {rid!r} is already here")

        def check(meta: KVMetadata) -> None:
            if meta.request_id != rid:
                raise ValueError(f"incoming KV is for {meta.request_id!r}, expected {rid!r}")

        def begin(meta: KVMetadata) -> object:
            check(meta)
            return self.engine.begin_import(meta)

        def reserve(meta: KVMetadata, num_prompt_tokens: int, num_output_tokens: int) -> object:
            check(meta)
            return self.engine.reserve_import(meta, num_prompt_tokens, num_output_tokens)

        self._tracked.setdefault(rid, Tracked(0, 0))
        finish, cancel = self._finish_import, self.engine.cancel
        if ipc is not None:
            attach = self.engine.attach_import
            receiver = IpcKVReceiver(
                manager.store,
                cmd.transfer_id,
                ipc,
                reserve,
                attach,
                finish,
                cancel,
                timeout_s=timeout_s,
            )
            self._transfers.add_ipc(key, False, timeout_s, receiver)
            return

        def make_receiver(group: Future[Group], remaining_s: float) -> KVReceiver:
            return KVReceiver(group, 0, begin, finish, cancel, timeout_s=remaining_s)

        pair = (cmd.peer_member_id, self.member_id)
        self._transfers.add_pair(key, False, timeout_s, pair, cmd.group_id, manager, make_receiver)

    def _finish_import(self, request_id: str) -> None:
        """All KV landed: runnable, but held until StartDecode unless that already came."""
        self.engine.finish_import(request_id)
        tracked = self._tracked.get(request_id)
        if tracked is None or not tracked.decode_requested:
            self.engine.pause(request_id)

    def _transfer_finished(self, transfer: Transfer, state: TransferState) -> None:
        rid = transfer.key[0]
        if state is TransferState.FAILED:
            self._transfer_report(transfer, "failed")
            if not transfer.is_source:
                self._tracked.pop(rid, None)  # the receiver freed its partial import
            return
        if transfer.is_source:
            if is_resident(self.engine, rid):
                self.engine.cancel(rid)  # the destination holds the KV now
            self._tracked.pop(rid, None)
        self._transfer_report(transfer, "done")

    def _transfer_report(self, transfer: Transfer, state: str) -> None:
        self._reports.append(
            m.KvTransferUpdate(
                request_id=transfer.key[0],
                transfer_id=transfer.key[1],
                state=state,
                is_source=transfer.is_source,
                num_bytes=transfer.num_bytes,
                duration_s=time.monotonic() - transfer.started_s,
                error=transfer.failure(),
            )
        )
