"""A worker's command handling and iteration loop around one engine (no process, no pipes).

`WorkerRuntime.handle(cmd)` applies an agent command at a chunk boundary; `run_once()` polls
the KV transfers and runs one engine iteration; both append `WorkerReport`s that
`take_reports()` hands to the caller (`dataplane.worker.process` ships them to the agent).
Output indices and counts in reports are relative to what this engine generated; the agent
adds the offset of tokens generated before a re-queue.

Failures are per request: an engine refusal, a broken transfer or an unknown request becomes
`Failed` for that request only, and the loop goes on. `retryable` is True when the request
could run elsewhere (it did not fit here, or this worker no longer holds it).

An SP group's rendezvous does not block the worker (`joining`): engine iterations, transfers
and the commands of other requests go on. What depends on the join waits, in arrival order,
until the join is decided (admitted or failed): the joining request's commands, the next
SpPrefill (one join at a time keeps the order of SP collectives the same on every member),
and every later command of a request that has one waiting. A Cancel of a joining or waiting
request takes it out at once: the join is given up (the request holds no KV yet), its
waiting commands are dropped, and Cancelled is reported unless the Cancel is silent.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from dataplane.engine import types as ev
from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState
from dataplane.engine.types import KVMetadata
from dataplane.parallel.groups import Group, GroupError, GroupManager
from dataplane.parallel.kv_ipc import IpcKVReceiver, IpcKVSender, IpcRegistry
from dataplane.parallel.kv_transfer import KVReceiver, KVSender, TransferState
from dataplane.parallel.topology import KVTransport, kv_transport
from dataplane.worker import messages as m
from dataplane.worker.sp_jobs import SpJobs
from dataplane.worker.transfers import Key, Transfer, TransferTable


@dataclass(slots=True)
class _Tracked:
    """Per-request bookkeeping the engine does not keep."""

    chunk_tokens: int  # prompt tokens per chunk (0 for an imported request)
    chunks_total: int  # chunks of the prompt
    chunks_done: int = 0  # chunks that ran
    pending_first_token: bool = False  # PrefillDone seen, first token not yet
    prompt_tokens: int = 0  # prompt length
    decode_requested: bool = False  # StartDecode arrived (destination of a transfer)


class WorkerRuntime:
    """Owns one engine and its transfers; every method runs on the worker's single thread.

    Args:
        engine: this worker's engine.
        member_id: this worker's instance id (its member id in groups).
        managers: store address -> the GroupManager rendezvousing through that store.
        ipc: this worker's CUDA IPC registry (CUDA workers only; None elsewhere).
    """

    def __init__(
        self,
        engine: Engine,
        member_id: str,
        managers: Callable[[str], GroupManager],
        ipc: IpcRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.member_id = member_id
        self._managers = managers
        self._ipc = ipc
        self._tracked: dict[str, _Tracked] = {}
        self._transfers = TransferTable()
        self._reports: list[m.WorkerReport] = []
        self._sp = SpJobs(engine, member_id, self._reports)
        self._waiting: deque[m.WorkerCommand] = deque()  # arrived during an SP join, in order
        self.busy_total_s = 0.0

    # ------------------------------------------------------------------ queries
    def has_work(self) -> bool:
        """Whether `run_once` would do anything (a runnable request or a live transfer)."""
        return self.engine.has_runnable_work() or bool(self._transfers) or self._sp.has_work()

    @property
    def joining(self) -> bool:
        """An SP group's rendezvous is pending (`run_once` polls it)."""
        return self._sp.joining is not None

    def take_reports(self) -> list[m.WorkerReport]:
        """The reports produced since the last call, in order."""
        out = list(self._reports)
        self._reports.clear()  # the list is shared with the SP jobs
        return out

    def load(self) -> m.Load:
        """The current load report."""
        eng = self.engine
        return m.Load(
            kv_used_tokens=eng.kv.pool_tokens - eng.num_free_kv_tokens,
            running_requests=eng.num_requests + len(self._sp),
            busy_total_s=self.busy_total_s,
            resident_request_ids=tuple(sorted(set(self._tracked) | set(self._sp.request_ids()))),
        )

    # ------------------------------------------------------------------ commands
    def handle(self, cmd: m.WorkerCommand) -> None:
        """Apply one command (or keep it until a pending SP join is decided, see the module
        docstring); refusals become Failed reports for its request, never exceptions.

        Retryable (the request may run elsewhere): it does not fit here, this worker no longer
        holds it, or an SP group's rendezvous failed. Not retryable: invalid arguments.
        """
        rid, joining = _request_of(cmd), self._sp.joining
        waits = joining is not None and (
            rid == joining
            or isinstance(cmd, m.SpPrefill)
            or any(_request_of(c) == rid for c in self._waiting)
        )
        if not waits:
            self._apply(cmd)
        elif isinstance(cmd, m.Cancel):
            if rid == joining:
                self._sp.abort_join()
            self._waiting = deque(c for c in self._waiting if _request_of(c) != rid)
            if not cmd.silent:
                self._reports.append(m.Cancelled(rid))
            self._apply_waiting()
        else:
            self._waiting.append(cmd)

    def _apply_waiting(self) -> None:
        """Apply the commands that waited for a join, in order, up to the next join."""
        while self._waiting and self._sp.joining is None:
            self._apply(self._waiting.popleft())

    def _apply(self, cmd: m.WorkerCommand) -> None:
        rid = _request_of(cmd)
        self._refusing(rid, type(cmd).__name__.lower(), lambda: self._dispatch(cmd))

    def _dispatch(self, cmd: m.WorkerCommand) -> None:
        rid = _request_of(cmd)
        if isinstance(cmd, m.Prefill):
            self._prefill(cmd)
        elif isinstance(cmd, m.SpPrefill):
            self._sp.admit(cmd, self._managers(cmd.store_address))
        elif rid in self._sp and isinstance(cmd, m.Pause | m.Resume | m.Cancel):
            self._sp_control(cmd)
        elif isinstance(cmd, m.Pause):
            self._pause(rid)
        elif isinstance(cmd, m.Resume):
            self._resume(rid)
        elif isinstance(cmd, m.Cancel):
            self._cancel(rid, cmd.silent)
        elif isinstance(cmd, m.SendKv | m.RecvKv):
            self._start_transfer(cmd)
        elif isinstance(cmd, m.StartDecode):
            self._start_decode(rid)

    def _refusing(self, rid: str, what: str, action: Callable[[], None]) -> None:
        """Run `action`; its refusal becomes a Failed report for `rid` (see `handle`)."""
        try:
            action()
        except EngineError as exc:
            retryable = exc.code in (EngineErrorCode.DOES_NOT_FIT, EngineErrorCode.UNKNOWN_REQUEST)
            self._fail(rid, f"{what}: {exc}", retryable)
        except GroupError as exc:
            self._fail(rid, f"{what}: {exc}", True)
        except ValueError as exc:  # e.g. a reused group id
            self._fail(rid, f"{what}: {exc}", False)

    def _sp_control(self, cmd: m.Pause | m.Resume | m.Cancel) -> None:
        if isinstance(cmd, m.Pause):
            self._sp.pause(cmd.request_id)
        elif isinstance(cmd, m.Resume):
            self._sp.resume(cmd.request_id)
        elif cmd.silent:
            self._sp.drop(cmd.request_id)
        else:
            self._sp.cancel(cmd.request_id)

    def _prefill(self, cmd: m.Prefill) -> None:
        if cmd.chunk_tokens < 1:
            raise EngineError(
                EngineErrorCode.INVALID_ARGUMENT,
                f"chunk_tokens must be >= 1, got {cmd.chunk_tokens}",
            )
        self.engine.add_request(
            cmd.request_id,
            list(cmd.prompt_token_ids),
            cmd.sampling,
            chunk_tokens=cmd.chunk_tokens,
            hold_after_prefill=not cmd.decode_in_place,
            batch_tokens=cmd.batch_tokens or None,
        )
        num_prompt = len(cmd.prompt_token_ids)
        self._tracked[cmd.request_id] = _Tracked(
            cmd.chunk_tokens, math.ceil(num_prompt / cmd.chunk_tokens), prompt_tokens=num_prompt
        )

    def _pause(self, request_id: str) -> None:
        """Pause a prefill; a Pause that crossed the prefill's end is dropped (the control
        plane moved the request on with PrefillDone and will never resume it)."""
        if self.engine.request_state(request_id) is not RequestState.PREFILLING:
            return
        self.engine.pause(request_id)
        tracked = self._tracked.get(request_id)
        self._reports.append(m.Paused(request_id, 0 if tracked is None else tracked.chunks_done))

    def _resume(self, request_id: str) -> None:
        state = self.engine.request_state(request_id)
        if state in (RequestState.PAUSED, RequestState.HELD):
            self.engine.resume(request_id)
        # PREFILLING / DECODING / IMPORTING: already running or about to; nothing to do.

    def _cancel(self, request_id: str, silent: bool) -> None:
        for key in self._transfers.keys_of(request_id):
            self._transfers.abort(key)  # a receiver frees its partial import itself
        if request_id in self._tracked or self._is_resident(request_id):
            if self._is_resident(request_id):
                self.engine.cancel(request_id)
            self._tracked.pop(request_id, None)
        if not silent:
            self._reports.append(m.Cancelled(request_id))

    def _start_transfer(self, cmd: m.SendKv | m.RecvKv) -> None:
        key = (cmd.request_id, cmd.transfer_id)
        if key in self._transfers:
            raise EngineError(EngineErrorCode.INVALID_STATE, f"transfer {cmd.transfer_id!r} exists")
        manager = self._managers(cmd.store_address)
        ipc = self._ipc_for(cmd.same_node)
        if isinstance(cmd, m.SendKv):
            self._start_send(cmd, key, manager, ipc)
        else:
            self._start_receive(cmd, key, manager, ipc)

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
        self._abort_sends(rid)  # the control plane gave up on them
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
        for old in self._transfers.keys_of(rid):
            self._transfers.abort(old)
        if self._is_resident(rid):
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

        self._tracked.setdefault(rid, _Tracked(0, 0))
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

    def _start_decode(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if not self._is_resident(request_id):
            if tracked is not None and self._transfers.keys_of(request_id):
                tracked.decode_requested = True  # decode once the import completes
                return
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no KV for {request_id!r} here")
        state = self.engine.request_state(request_id)
        if state is RequestState.IMPORTING:
            if tracked is not None:
                tracked.decode_requested = True
            return
        if state in (RequestState.PAUSED, RequestState.HELD):
            self._abort_sends(request_id)  # decode where prefilled: its destination was lost
            self.engine.resume(request_id)

    def _abort_sends(self, request_id: str) -> None:
        """Abort the request's outgoing KV transfers, silently (the control plane no longer
        tracks them): one that completed later would free the KV this worker uses again."""
        for key in self._transfers.keys_of(request_id, sources_only=True):
            self._transfers.abort(key)

    # ------------------------------------------------------------------ iteration
    def run_once(self) -> None:
        """Poll every transfer, then run one engine iteration if anything is runnable."""
        for transfer, state in self._transfers.poll():
            if state is TransferState.TRANSFERRING:
                self._transfer_report(transfer, "transferring")
            else:
                self._transfer_finished(transfer, state)
        joining = self._sp.joining
        if joining is not None:
            self._refusing(joining, "spprefill", self._sp.poll_join)
            self._apply_waiting()
        self.busy_total_s += self._sp.run_once()
        if not self.engine.has_runnable_work():
            return
        start_s = time.perf_counter()
        events = self.engine.step()
        duration_s = time.perf_counter() - start_s
        self.busy_total_s += duration_s
        self._convert(events, duration_s)

    def _transfer_finished(self, transfer: Transfer, state: TransferState) -> None:
        rid = transfer.key[0]
        if state is TransferState.FAILED:
            self._transfer_report(transfer, "failed")
            if not transfer.is_source:
                self._tracked.pop(rid, None)  # the receiver freed its partial import
            return
        if transfer.is_source:
            if self._is_resident(rid):
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

    def _convert(self, events: list[ev.EngineEvent], duration_s: float) -> None:
        tokens: dict[str, list[tuple[int, int]]] = {}
        for event in events:
            rid = event.request_id
            tracked = self._tracked.get(rid)
            if isinstance(event, ev.ChunkDone) and tracked is not None:
                tracked.chunks_done += 1
                self._reports.append(
                    m.PrefillChunkDone(
                        rid,
                        tracked.chunks_done - 1,
                        max(tracked.chunks_total, tracked.chunks_done),
                        event.num_prefilled_tokens,
                        duration_s,
                        self.engine.num_iterations,
                        self.engine.last_iteration_tokens,
                        event.num_chunk_tokens,
                    )
                )
            elif isinstance(event, ev.PrefillDone) and tracked is not None:
                tracked.pending_first_token = True
            elif isinstance(event, ev.TokenGenerated):
                if tracked is not None and tracked.pending_first_token:
                    tracked.pending_first_token = False
                    self._reports.append(m.PrefillDone(rid, tracked.prompt_tokens, event.token_id))
                tokens.setdefault(rid, []).append((event.num_output_tokens - 1, event.token_id))
            elif isinstance(event, ev.Finished):
                self._flush_tokens(rid, tokens.pop(rid, []))
                self._tracked.pop(rid, None)
                self._reports.append(
                    m.Finished(rid, len(event.output_token_ids), event.reason.value)
                )
        for rid, items in tokens.items():
            self._flush_tokens(rid, items)

    def _flush_tokens(self, request_id: str, items: list[tuple[int, int]]) -> None:
        if items:
            self._reports.append(
                m.Tokens(request_id, items[0][0], tuple(token for _, token in items))
            )

    # ------------------------------------------------------------------ helpers
    def _is_resident(self, request_id: str) -> bool:
        try:
            self.engine.request_state(request_id)
        except EngineError:
            return False
        return True

    def _fail(self, request_id: str, error: str, retryable: bool) -> None:
        self._reports.append(m.Failed(request_id, error, retryable))


def _request_of(cmd: m.WorkerCommand) -> str:
    """The request a command is about ("" for Stop)."""
    return str(getattr(cmd, "request_id", ""))
