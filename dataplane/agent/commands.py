"""Commands from the control plane -> worker commands; worker reports -> wire events.

`CommandRouter` is a pure state machine over the node's `RequestTable`: each input (a command,
a worker report, a worker's death, a drain) with the time `now_s` (wall clock, seconds since the
epoch: the events' `at_s`) returns a `Step` (worker commands and events, in order) and updates
the table. It reads no clock, sends nothing and knows nothing of the agent that drives it.

Semantics on the wire (kept in step with protos/pecsched/v1/cluster.proto):

* StartPrefill with one instance runs on that worker's engine in `chunk_tokens` chunks (0 means
  the default of 512); `decode_in_place` decodes there afterwards, otherwise the request is
  HELD after its first token until TransferKv. `generated_token_ids` (a re-queue) are
  prefilled with the prompt and decoding continues after them; output indices and counts on
  the wire include them. More than one instance: sequence-parallel prefill over those workers
  (`sp_kind` Ulysses or ring, chunks of `chunk_tokens` over the whole group, pausable between
  chunks), then decode on the same group (KV stays sharded), so `decode_in_place` must be set.
  The group may span nodes when `rendezvous_address` and `group_id` are set (every node gets
  the same command; its members here join the group at that store, gloo on CPU, NCCL on GPU);
  otherwise every member must be on this node, meeting at this node's store under `group_id`
  or a fresh local id. Only rank 0's node (`instance_ids[0]`) reports the progress; the
  other nodes report only failures and cancellations, and forget the request when their
  members finish.
* Colocate runs the short prefill on `prefill.instance_ids[0]` with chunks of at most
  `iteration_prefill_budget_tokens`, inside the iterations of whatever that worker runs.
  `mixed_batch_tokens` > 0 (sarathi's mixed prefills) also bounds, while it prefills, every
  iteration of that worker to that many tokens in all, decodes included (the engine's own
  `max_batch_tokens` still applies: the smaller wins).
* Pause / Resume act at the next chunk boundary; Pause answers `Paused(chunks_done)`. A Pause
  that arrives after the prefill ended is dropped (unanswered): only prefills pause.
* TransferKv: the transport follows the topology (`dataplane.worker.transfers`): between two
  GPU workers of this node the destination copies the KV through CUDA IPC; otherwise the pair
  sends over its persistent group (rendezvous through `rendezvous_address`, default this
  node's store; a group created by this transfer gets the id `group_id`, default
  "kv/<transfer_id>"), one transfer of a pair at a time, in command order. TRANSFERRING is
  reported when sending starts, DONE once the destination holds all of it (the source copy is
  freed then), FAILED from either side. The destination never decodes before DONE and
  StartDecode; a newer TransferKv to it for the same request supersedes an older one.
* StartDecode resumes `instance_id` (older control planes leave it empty: the destination of
  `transfer_id`, or the one worker holding the request); a refusal names `instance_id`.
* Cancel frees the request on every worker here (aborting transfers) and answers one
  Cancelled, also for a request this node does not hold.
* Tokens events carry every generated token including the first; PrefillDone repeats it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dataplane.agent import convert, transfers
from dataplane.agent.prefills import PrefillStarter
from dataplane.agent.routes import RequestTable, Route
from dataplane.agent.steps import (
    CommandError,
    Node,
    Retryable,
    Step,
    cancelled_event,
    failed_event,
    request_id_of,
    resident_route,
)
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2

_Handler = Callable[["CommandRouter", Step, cluster_pb2.Command, str, float], None]


class CommandRouter:
    """See the module docstring. `draining` refuses new work (set by `start_drain`)."""

    def __init__(self, node: Node, table: RequestTable | None = None) -> None:
        self.node = node
        self.table = table if table is not None else RequestTable()
        self.prefills = PrefillStarter(node, self.table)
        self.draining = False

    def worker_ready(self, index: int, eos_token_ids: Sequence[int]) -> None:
        """Worker `index` runs a model with these end-of-sequence tokens."""
        self.prefills.worker_ready(index, eos_token_ids)

    # ------------------------------------------------------------------ commands
    def on_command(self, command: cluster_pb2.Command, now_s: float) -> Step:
        """Apply one command; an invalid one becomes a Failed event (and `Step.error`)."""
        step = Step()
        kind = command.WhichOneof("kind")
        rid = request_id_of(command)
        try:
            handler = _HANDLERS.get(kind or "")
            if handler is None:
                raise CommandError(f"command has no known kind (got {kind!r})")
            handler(self, step, command, rid, now_s)
        except CommandError as exc:
            step.error = str(exc)
            retryable = isinstance(exc, Retryable)
            # A refused StartDecode names its instance (the control plane matches it exactly).
            target = command.start_decode.instance_id if kind == "start_decode" else ""
            step.events.append(
                failed_event(rid, target, f"{kind or 'command'}: {exc}", retryable, now_s)
            )
        return step

    def _start_prefill(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        self.prefills.start(step, cmd.start_prefill, None, 0, self.draining)

    def _colocate(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        colocate = cmd.colocate
        budget = colocate.iteration_prefill_budget_tokens
        if budget < 1:
            raise CommandError("colocate.iteration_prefill_budget_tokens must be >= 1")
        self.prefills.start(
            step, colocate.prefill, budget, colocate.mixed_batch_tokens, self.draining
        )

    def _pause(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        self._to_holders(step, rid, m.Pause(rid), "pause")

    def _resume(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        self._to_holders(step, rid, m.Resume(rid), "resume")
        self.table.routes[rid].paused = False

    def _transfer_kv(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        transfers.start_transfer(step, self.node, self.table, cmd.transfer_kv)

    def _start_decode(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        transfers.start_decode(step, self.node, self.table, cmd.start_decode)

    def _shutdown(self, step: Step, cmd: cluster_pb2.Command, rid: str, now_s: float) -> None:
        step.shutdown = cmd.shutdown

    def _to_holders(self, step: Step, request_id: str, cmd: m.WorkerCommand, what: str) -> None:
        for index in sorted(resident_route(self.table, request_id, what).workers):
            step.send(index, cmd)

    def _cancel(self, step: Step, cmd: cluster_pb2.Command, request_id: str, now_s: float) -> None:
        """Retire the request's route at once and cancel it on its workers.

        The control plane may place the request here again right after the Cancel (a re-queue
        in the same tick): the new command must find no route. Until each worker has answered
        Cancelled, its reports about the request belong to the cancelled work and are dropped
        (`on_report`); the one Cancelled event is sent once all have answered.
        """
        route = self.table.routes.pop(request_id, None)
        if route is None or not route.workers:
            step.events.append(cancelled_event(request_id, now_s))
            return
        self.table.start_cancel(request_id, route.workers)
        for index in sorted(route.workers):
            step.send(index, m.Cancel(request_id))

    # ------------------------------------------------------------------ reports
    def on_report(self, index: int, report: m.WorkerReport, now_s: float) -> Step:
        """Turn one worker report about a request into at most one event; update the route."""
        step = Step()
        table = self.table
        rid = getattr(report, "request_id", "")
        if table.awaits_cancel(rid, index):
            # The worker reports in order: all it says before Cancelled is about the
            # cancelled work, whatever route the request has here now.
            if isinstance(report, m.Cancelled) and table.cancel_answered(rid, index):
                step.events.append(cancelled_event(rid, now_s))
            return step
        route = table.routes.get(rid)
        if route is None:
            return step
        if index in route.followers and isinstance(report, _Progress):
            self._follower_report(rid, index, report, route)
            return step
        instance_id = self.node.instance_id(index)
        destination = ""
        if isinstance(report, m.KvTransferUpdate):
            info = table.transfers.get(report.transfer_id)
            if info is None or not transfers.transfer_report(table, index, report):
                return step
            instance_id, destination = info.source_id, info.destination_id
        elif isinstance(report, m.Cancelled):
            return step  # an SP member's answer to a Cancel this router did not send
        elif isinstance(report, m.Finished):
            del table.routes[rid]
        elif isinstance(report, m.Failed):
            del table.routes[rid]  # one Failed per request; the other holders free it silently
            for other in sorted(route.workers - {index}):
                step.send(other, m.Cancel(rid, silent=True))
        elif isinstance(report, m.Paused):
            route.paused = True
        elif isinstance(report, m.PrefillChunkDone):
            route.paused = False
        event = convert.report_to_event(
            report, instance_id, now_s, route.offset_tokens, route.prompt_tokens, destination
        )
        if event is not None:
            step.events.append(event)
        return step

    def _follower_report(
        self, request_id: str, index: int, report: _Progress, route: Route
    ) -> None:
        """Progress of an SP member other than rank 0 (which reports it, here or on another
        node): it only tells what this member still holds."""
        if isinstance(report, m.Paused):
            route.paused = True
        elif isinstance(report, m.Finished):
            route.followers.discard(index)
            self.table.release(request_id, index)  # the route goes once rank 0 is elsewhere

    # ------------------------------------------------------------------ node events
    def worker_died(self, index: int, exit_code: int | None, now_s: float) -> Step:
        """Worker `index` is gone: its requests fail (retryable), its pending Cancels answer."""
        step = Step()
        table = self.table
        instance_id = self.node.instance_id(index)
        for rid in table.held_by(index):
            route = table.routes.pop(rid)
            for other in sorted(route.workers - {index}):
                step.send(other, m.Cancel(rid, silent=True))
            error = f"instance {instance_id} died (exit code {exit_code})"
            step.events.append(failed_event(rid, instance_id, error, True, now_s))
        for rid in sorted(rid for rid, waiting in table.cancelling.items() if index in waiting):
            if table.cancel_answered(rid, index):  # the dead worker holds nothing
                step.events.append(cancelled_event(rid, now_s))
        return step

    def drop(self, request_ids: Sequence[str]) -> Step:
        """Free requests the control plane no longer runs here, silently."""
        step = Step()
        for rid in request_ids:
            route = self.table.routes.pop(rid, None)
            if route is not None:
                for index in sorted(route.workers):
                    step.send(index, m.Cancel(rid, silent=True))
        return step

    def start_drain(self, now_s: float) -> Step:
        """Refuse new work from now on; paused requests are handed back at once."""
        self.draining = True
        return self.hand_back(
            self.table.paused(), "agent draining: paused request handed back", now_s
        )

    def hand_back(self, request_ids: Sequence[str], reason: str, now_s: float) -> Step:
        """Free requests on every worker here and report each Failed(retryable)."""
        step = Step()
        for rid in request_ids:
            route = self.table.routes.pop(rid)
            for index in sorted(route.workers):
                step.send(index, m.Cancel(rid, silent=True))
            first = min(route.workers) if route.workers else 0
            step.events.append(failed_event(rid, self.node.instance_id(first), reason, True, now_s))
        return step


_Progress = (
    m.PrefillChunkDone | m.PrefillDone | m.Paused | m.Tokens | m.Finished
)  # rank 0 reports it

_HANDLERS: dict[str, _Handler] = {  # command kind -> what the router does with it
    "start_prefill": CommandRouter._start_prefill,
    "colocate": CommandRouter._colocate,
    "pause": CommandRouter._pause,
    "resume": CommandRouter._resume,
    "cancel": CommandRouter._cancel,
    "transfer_kv": CommandRouter._transfer_kv,
    "start_decode": CommandRouter._start_decode,
    "shutdown": CommandRouter._shutdown,
}
