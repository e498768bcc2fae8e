"""Commands from the control plane -> worker commands; worker reports -> wire events.

Semantics on the wire (kept in step with protos/pecsched/v1/cluster.proto):

* StartPrefill with one instance runs on that worker's engine in `chunk_tokens` chunks (0 means
  the default of 512); `decode_in_place` decodes there afterwards, otherwise the request is
  HELD after its first token until TransferKv. `generated_token_ids` (a re-queue) are
  prefilled with the prompt and decoding continues after them; output indices and counts on
  the wire include them. More than one instance: sequence-parallel prefill over those workers
  (`sp_kind` Ulysses or ring, chunks of `chunk_tokens` over the whole group, pausable between
  chunks), then decode on the same group (KV stays sharded), so `decode_in_place` must be set.
  All members must be on this node (StartPrefill names no rendezvous store); the group id is
  `group_id`, or a fresh local one. Rank 0 (`instance_ids[0]`) reports the progress.
* Colocate runs the short prefill on `prefill.instance_ids[0]` with chunks of at most
  `iteration_prefill_budget_tokens`, inside the iterations of whatever that worker runs.
* Pause / Resume act at the next chunk boundary; Pause answers `Paused(chunks_done)`.
* TransferKv: the transport follows the topology (`dataplane.worker.transfers`): between two
  GPU workers of this node the destination copies the KV through CUDA IPC; otherwise the pair
  sends over its persistent group (rendezvous through `rendezvous_address`, default this
  node's store; a group created by this transfer gets the id `group_id`, default
  "kv/<transfer_id>"), one transfer of a pair at a time, in command order. TRANSFERRING is
  reported when sending starts, DONE once the destination holds all of it (the source copy is
  freed then), FAILED from either side. The destination never decodes before DONE and
  StartDecode; a newer TransferKv to it for the same request supersedes an older one.
* StartDecode resumes the destination of `transfer_id` (or the one worker holding the request).
* Cancel frees the request on every worker here (aborting transfers) and answers one
  Cancelled, also for a request this node does not hold.
* Tokens events carry every generated token including the first; PrefillDone repeats it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dataplane.agent import convert
from dataplane.agent.routes import Route, TransferInfo
from dataplane.agent.tracing import command_span
from dataplane.engine.types import SamplingParams
from dataplane.parallel.topology import shared_devices
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2, common_pb2

if TYPE_CHECKING:
    from dataplane.agent.core import AgentCore

DEFAULT_CHUNK_TOKENS = 512


class CommandError(ValueError):
    """An invalid command; the message names the field."""


class CommandRouter:
    """The command and report half of `AgentCore` (shares its state)."""

    def __init__(self, core: AgentCore) -> None:
        self.core = core
        self.sp_groups = 0  # SP groups started here (fresh group ids when the CP sends none)

    # ------------------------------------------------------------------ commands
    def dispatch(self, command: cluster_pb2.Command) -> None:
        """Apply one command; an invalid one becomes a Failed event."""
        kind = command.WhichOneof("kind")
        body = getattr(command, kind) if kind else None
        rid = (
            getattr(body, "request_id", "")
            if kind != "colocate"
            else command.colocate.prefill.request_id
        )
        span = command_span(
            self.core.tracer, command, kind or "unknown", rid, self.core.config.node_id
        )
        try:
            if kind == "start_prefill":
                self._start_prefill(command.start_prefill, None)
            elif kind == "colocate":
                budget = command.colocate.iteration_prefill_budget_tokens
                if budget < 1:
                    raise CommandError("colocate.iteration_prefill_budget_tokens must be >= 1")
                self._start_prefill(command.colocate.prefill, budget)
            elif kind == "pause":
                self._to_holders(rid, m.Pause(rid), "pause")
            elif kind == "resume":
                self._to_holders(rid, m.Resume(rid), "resume")
                self.core.routes[rid].paused = False
            elif kind == "cancel":
                self._cancel(rid)
            elif kind == "transfer_kv":
                self._transfer(command.transfer_kv)
            elif kind == "start_decode":
                self._start_decode(command.start_decode)
            elif kind == "shutdown":
                self._shutdown(command.shutdown.drain)
            else:
                raise CommandError(f"command has no known kind (got {kind!r})")
        except CommandError as exc:
            retryable = isinstance(exc, _Retryable)
            self.core.emit_failed(rid, "", f"{kind or 'command'}: {exc}", retryable)
            span.set_attribute("pecsched.error", str(exc))
        finally:
            span.end()

    def _start_prefill(self, cmd: cluster_pb2.StartPrefill, budget_tokens: int | None) -> None:
        core = self.core
        if not cmd.request_id:
            raise CommandError("request_id must not be empty")
        if core.draining:
            raise _Retryable(f"node {core.config.node_id} is draining; run it elsewhere")
        if cmd.request_id in core.routes:
            raise CommandError(f"request_id {cmd.request_id!r} is already resident here")
        if not cmd.prompt_token_ids:
            raise CommandError("prompt_token_ids must not be empty")
        if cmd.max_new_tokens < 1:
            raise CommandError(f"max_new_tokens must be >= 1, got {cmd.max_new_tokens}")
        if not cmd.instance_ids:
            raise CommandError("instance_ids must not be empty")
        indices = [self._local(iid, f"instance_ids[{i}]") for i, iid in enumerate(cmd.instance_ids)]
        if len(set(indices)) != len(indices):
            raise CommandError(f"instance_ids repeat an instance: {list(cmd.instance_ids)}")
        ready = core.ready[indices[0]]
        assert ready is not None
        generated = tuple(cmd.generated_token_ids)
        remaining = cmd.max_new_tokens - len(generated)
        if remaining < 1:
            raise CommandError(
                f"generated_token_ids has {len(generated)} tokens: nothing left of "
                f"max_new_tokens={cmd.max_new_tokens}"
            )
        try:
            sampling = convert.sampling_from_proto(cmd.sampling, remaining, ready.eos_token_ids)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        chunk = cmd.chunk_tokens or DEFAULT_CHUNK_TOKENS
        if budget_tokens is not None:
            chunk = min(chunk, budget_tokens)
        prompt = tuple(cmd.prompt_token_ids) + generated
        if len(indices) > 1:
            self._start_sp(cmd, indices, prompt, sampling, chunk, len(generated))
            return
        index = indices[0]
        core.routes[cmd.request_id] = Route({index}, len(generated), len(cmd.prompt_token_ids))
        core.ports.send_worker(
            index,
            m.Prefill(
                request_id=cmd.request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                chunk_tokens=chunk,
                decode_in_place=cmd.decode_in_place,
            ),
        )

    def _start_sp(
        self,
        cmd: cluster_pb2.StartPrefill,
        indices: list[int],
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        chunk: int,
        offset: int,
    ) -> None:
        """Every member of an SP group on this node gets its SpPrefill, in rank order."""
        core = self.core
        if not cmd.decode_in_place:
            raise CommandError(
                "decode_in_place must be set for an SP group (its sharded KV decodes in place)"
            )
        devices = [f"cuda:{core.device_indices[i]}" for i in indices] if self._on_cuda else []
        shared = shared_devices(tuple(devices))
        if shared:
            raise CommandError(
                f"SP group {list(cmd.instance_ids)} shares GPU(s) {', '.join(shared)}: NCCL "
                "cannot put two ranks of one group on one GPU (run SP over distinct GPUs)"
            )
        self.sp_groups += 1
        group_id = cmd.group_id or f"sp/{cmd.request_id}/{core.config.node_id}/{self.sp_groups}"
        core.routes[cmd.request_id] = Route(set(indices), offset, len(cmd.prompt_token_ids))
        for index in indices:
            core.ports.send_worker(
                index,
                m.SpPrefill(
                    request_id=cmd.request_id,
                    prompt_token_ids=prompt,
                    sampling=sampling,
                    chunk_tokens=chunk,
                    ring=cmd.sp_kind == common_pb2.SP_KIND_RING,
                    group_id=group_id,
                    member_ids=tuple(cmd.instance_ids),
                    store_address=core.rendezvous_address,
                ),
            )

    @property
    def _on_cuda(self) -> bool:
        return self.core.config.device == "cuda"

    def _local(self, instance_id: str, field: str) -> int:
        index = self.core.index_of(instance_id)
        if index is None:
            raise CommandError(
                f"{field} {instance_id!r} is not an instance of node {self.core.config.node_id!r}"
            )
        return index

    def _route(self, request_id: str, what: str) -> Route:
        route = self.core.routes.get(request_id)
        if route is None:
            raise _Retryable(f"request {request_id!r} is not resident on this node ({what})")
        return route

    def _to_holders(self, request_id: str, cmd: m.WorkerCommand, what: str) -> None:
        for index in sorted(self._route(request_id, what).workers):
            self.core.ports.send_worker(index, cmd)

    def _cancel(self, request_id: str) -> None:
        """Retire the request's route at once and cancel it on its workers.

        The control plane may place the request here again right after the Cancel (a re-queue
        in the same tick): the new command must find no route. Until each worker has answered
        Cancelled, its reports about the request belong to the cancelled work and are dropped
        (`on_report`); the one Cancelled event is sent once all have answered.
        """
        core = self.core
        route = core.routes.pop(request_id, None)
        if route is None or not route.workers:
            self._emit_cancelled(request_id)
            return
        core.cancelling.setdefault(request_id, set()).update(route.workers)
        for index in sorted(route.workers):
            core.ports.send_worker(index, m.Cancel(request_id))

    def _emit_cancelled(self, request_id: str) -> None:
        event = cluster_pb2.Event(request_id=request_id, at_s=time.time())
        event.cancelled.CopyFrom(cluster_pb2.Cancelled())
        self.core.emit(event)

    def cancel_answered(self, request_id: str, index: int) -> None:
        """Worker `index` answered (or died): the Cancelled event once every holder has."""
        waiting = self.core.cancelling.get(request_id)
        if waiting is None or index not in waiting:
            return
        waiting.discard(index)
        if not waiting:
            del self.core.cancelling[request_id]
            self._emit_cancelled(request_id)

    def _transfer(self, cmd: cluster_pb2.TransferKv) -> None:
        core = self.core
        if not cmd.transfer_id:
            raise CommandError("transfer_id must not be empty")
        if cmd.timeout_s < 0:
            raise CommandError(f"timeout_s must be >= 0, got {cmd.timeout_s}")
        src, dst = core.index_of(cmd.source_instance_id), core.index_of(cmd.destination_instance_id)
        if src is None and dst is None:
            raise CommandError(
                f"neither source_instance_id {cmd.source_instance_id!r} nor "
                f"destination_instance_id {cmd.destination_instance_id!r} is on this node"
            )
        if src is not None and src == dst:
            raise CommandError("source_instance_id equals destination_instance_id")
        store = cmd.rendezvous_address or core.rendezvous_address
        group_id = cmd.group_id or f"kv/{cmd.transfer_id}"
        timeout_s = cmd.timeout_s or core.config.group_timeout_s
        route = core.routes.get(cmd.request_id)
        if src is not None:
            if route is None or src not in route.workers:
                raise _Retryable(
                    f"request {cmd.request_id!r} is not resident on {cmd.source_instance_id}"
                )
        elif route is None:
            route = core.routes[cmd.request_id] = Route(set(), 0, 0)
        core.transfers[cmd.transfer_id] = TransferInfo(
            cmd.request_id, cmd.source_instance_id, cmd.destination_instance_id
        )
        args = (cmd.request_id, cmd.transfer_id, group_id)
        same_node = src is not None and dst is not None  # CUDA: IPC between the two workers
        if src is not None:
            core.ports.send_worker(
                src, m.SendKv(*args, cmd.destination_instance_id, store, timeout_s, same_node)
            )
        if dst is not None:
            route.workers.add(dst)
            core.ports.send_worker(
                dst, m.RecvKv(*args, cmd.source_instance_id, store, timeout_s, same_node)
            )

    def _start_decode(self, cmd: cluster_pb2.StartDecode) -> None:
        core = self.core
        route = self._route(cmd.request_id, "start_decode")
        info = core.transfers.get(cmd.transfer_id) if cmd.transfer_id else None
        if info is not None:
            index = core.index_of(info.destination_id)
            if index is None:
                raise CommandError(f"transfer {cmd.transfer_id!r} ends on another node")
        elif len(route.workers) == 1:
            index = next(iter(route.workers))
        else:
            raise CommandError(f"transfer_id {cmd.transfer_id!r} is unknown here")
        if route.prompt_tokens == 0 and cmd.generated_token_ids:
            # KV from another node: it carries exactly the first generated token.
            route.offset_tokens = len(cmd.generated_token_ids) - 1
        core.ports.send_worker(index, m.StartDecode(cmd.request_id))

    def _shutdown(self, drain: bool) -> None:
        self.core.start_drain(time.monotonic())
        if not drain:
            self.core.hand_back_all("agent shut down: the request was handed back")

    # ------------------------------------------------------------------ reports
    def on_report(self, index: int, report: m.WorkerReport) -> None:
        """Turn one worker report into at most one event and update the route."""
        core = self.core
        rid = getattr(report, "request_id", "")
        if index in core.cancelling.get(rid, ()):
            # The worker reports in order: all it says before Cancelled is about the
            # cancelled work, whatever route the request has here now.
            if isinstance(report, m.Cancelled):
                self.cancel_answered(rid, index)
            return
        route = core.routes.get(rid)
        if route is None:
            return
        instance_id = core.instance_id(index)
        destination = ""
        if isinstance(report, m.TransferUpdate):
            info = core.transfers.get(report.transfer_id)
            if info is None or not self._transfer_report(index, report, route):
                return
            instance_id, destination = info.source_id, info.destination_id
        elif isinstance(report, m.Cancelled):
            return  # an SP member's answer to a Cancel this router did not send
        elif isinstance(report, m.Finished):
            del core.routes[rid]
        elif isinstance(report, m.Failed):
            del core.routes[rid]  # one Failed per request; the other holders free it silently
            for other in sorted(route.workers - {index}):
                core.ports.send_worker(other, m.Cancel(rid, silent=True))
        elif isinstance(report, m.Paused):
            route.paused = True
        elif isinstance(report, m.ChunkDone):
            route.paused = False
        event = convert.report_to_event(
            report, instance_id, time.time(), route.offset_tokens, route.prompt_tokens, destination
        )
        if event is not None:
            core.emit(event)

    def _transfer_report(self, index: int, report: m.TransferUpdate, route: Route) -> bool:
        """Bookkeeping of a transfer report; True when it becomes an event."""
        core = self.core
        if report.state == "failed":
            if not report.is_source:
                route.workers.discard(index)  # the receiver freed its partial import
                if not route.workers:
                    # Nothing of the request is left here (the source is elsewhere): a later
                    # StartPrefill or TransferKv for it must find no route.
                    del core.routes[report.request_id]
            if report.transfer_id in core.failed_transfers:
                return False
            core.failed_transfers.add(report.transfer_id)
            return True
        if report.state == "done":
            if report.is_source:
                route.workers.discard(index)  # the source copy is freed
                if not route.workers:
                    del core.routes[report.request_id]
                return False
            return True
        return report.is_source  # "transferring": once, from the sender


class _Retryable(CommandError):
    """An invalid command whose request may still run elsewhere (Failed, retryable)."""
