"""A worker's command handling and iteration loop around one engine (no process, no pipes).

`WorkerRuntime.handle(cmd)` applies an agent command at a chunk boundary; `run_once()` polls
the KV transfers and runs one engine iteration; both append `WorkerReport`s that
`take_reports()` hands to the caller (`dataplane.worker.process` ships them to the agent).
Output indices and counts in reports are relative to what this engine generated; the agent
adds the offset of tokens generated before a re-queue. The parts: KV transfers are
`dataplane.worker.handoff`, engine events become reports in `dataplane.worker.tracking`, SP
requests are `dataplane.worker.sp_jobs`; this module routes commands to them and the engine.

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

from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState
from dataplane.parallel.groups import GroupError, GroupManager
from dataplane.parallel.kv_ipc import IpcRegistry
from dataplane.worker import messages as m
from dataplane.worker.handoff import KVHandoffs
from dataplane.worker.sp_jobs import SpJobs
from dataplane.worker.tracking import Tracked, is_resident, report_events


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
        self._tracked: dict[str, Tracked] = {}
        self._reports: list[m.WorkerReport] = []
        self._handoffs = KVHandoffs(engine, member_id, managers, ipc, self._tracked, self._reports)
        self._sp = SpJobs(engine, member_id, self._reports)
        self._waiting: deque[m.WorkerCommand] = deque()  # arrived during an SP join, in order
        self.busy_total_s = 0.0

    # ------------------------------------------------------------------ queries
    def has_work(self) -> bool:
        """Whether `run_once` would do anything (a runnable request or a live transfer)."""
        return self.engine.has_runnable_work() or bool(self._handoffs) or self._sp.has_work()

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
            self._handoffs.start(cmd)
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
        self._tracked[cmd.request_id] = Tracked(
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
        self._handoffs.abort_all(request_id)
        if request_id in self._tracked or is_resident(self.engine, request_id):
            if is_resident(self.engine, request_id):
                self.engine.cancel(request_id)
            self._tracked.pop(request_id, None)
        if not silent:
            self._reports.append(m.Cancelled(request_id))

    def _start_decode(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if not is_resident(self.engine, request_id):
            if tracked is not None and self._handoffs.pending(request_id):
                tracked.decode_requested = True  # decode once the import completes
                return
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no KV for {request_id!r} here")
        state = self.engine.request_state(request_id)
        if state is RequestState.IMPORTING:
            if tracked is not None:
                tracked.decode_requested = True
            return
        if state in (RequestState.PAUSED, RequestState.HELD):
            # Decode where prefilled: its destination was lost.
            self._handoffs.abort_sends(request_id)
            self.engine.resume(request_id)

    # ------------------------------------------------------------------ iteration
    def run_once(self) -> None:
        """Poll every transfer, then run one engine iteration if anything is runnable."""
        self._handoffs.poll()
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
        report_events(self.engine, self._tracked, events, duration_s, self._reports)

    def _fail(self, request_id: str, error: str, retryable: bool) -> None:
        self._reports.append(m.Failed(request_id, error, retryable))


def _request_of(cmd: m.WorkerCommand) -> str:
    """The request a command is about ("" for Stop)."""
    return str(getattr(cmd, "request_id", ""))
