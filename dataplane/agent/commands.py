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

from collections.abc import Sequence
from dataclasses import dataclass, field

from dataplane.agent import convert
from dataplane.agent.config import instance_id
from dataplane.agent.routes import RequestTable, Route, TransferInfo
from dataplane.engine.types import SamplingParams
from dataplane.parallel.topology import shared_devices
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2, common_pb2

DEFAULT_CHUNK_TOKENS = 512


class CommandError(ValueError):
    """An invalid command; the message names the field."""


class _Retryable(CommandError):
    """An invalid command whose request may still run elsewhere (Failed, retryable)."""


@dataclass(frozen=True, slots=True)
class Node:
    """What the router knows of this node; fixed at start."""

    node_id: str
    num_workers: int
    device: str  # "cpu" or "cuda"
    device_indices: tuple[int, ...]  # per worker: GPU index (CPU: the worker index)
    rendezvous_address: str  # this node's rendezvous store (host:port)
    group_timeout_s: float  # default timeout of a KV transfer's group

    def instance_id(self, index: int) -> str:
        """Instance id of worker `index`."""
        return instance_id(self.node_id, index)

    def index_of(self, instance_id: str) -> int | None:
        """Worker index of one of this node's instance ids, else None."""
        prefix = f"{self.node_id}/"
        if not instance_id.startswith(prefix):
            return None
        tail = instance_id[len(prefix) :]
        if not tail.isdigit() or int(tail) >= self.num_workers:
            return None
        return int(tail)


@dataclass(slots=True)
class Step:
    """What one input makes the agent do, in order."""

    to_workers: list[tuple[int, m.WorkerCommand]] = field(default_factory=list)
    events: list[cluster_pb2.Event] = field(default_factory=list)
    shutdown: cluster_pb2.Shutdown | None = None  # a Shutdown command: the agent drains
    error: str | None = None  # the command was refused (its Failed event is in `events`)

    def send(self, index: int, cmd: m.WorkerCommand) -> None:
        """Add a worker command."""
        self.to_workers.append((index, cmd))


class CommandRouter:
    """See the module docstring. `draining` refuses new work (set by `start_drain`)."""

    def __init__(self, node: Node, table: RequestTable | None = None) -> None:
        self.node = node
        self.table = table if table is not None else RequestTable()
        self.eos_token_ids: list[tuple[int, ...] | None] = [None] * node.num_workers
        self.draining = False
        self.sp_groups = 0  # SP groups started here (fresh group ids when the CP sends none)

    def worker_ready(self, index: int, eos_token_ids: Sequence[int]) -> None:
        """Worker `index` runs a model with these end-of-sequence tokens."""
        self.eos_token_ids[index] = tuple(eos_token_ids)

    # ------------------------------------------------------------------ commands
    def on_command(self, command: cluster_pb2.Command, now_s: float) -> Step:
        """Apply one command; an invalid one becomes a Failed event (and `Step.error`)."""
        step = Step()
        kind = command.WhichOneof("kind")
        rid = request_id_of(command)
        try:
            if kind == "start_prefill":
                self._start_prefill(step, command.start_prefill, None)
            elif kind == "colocate":
                colocate = command.colocate
                budget = colocate.iteration_prefill_budget_tokens
                if budget < 1:
                    raise CommandError("colocate.iteration_prefill_budget_tokens must be >= 1")
                self._start_prefill(step, colocate.prefill, budget, colocate.mixed_batch_tokens)
            elif kind == "pause":
                self._to_holders(step, rid, m.Pause(rid), "pause")
            elif kind == "resume":
                self._to_holders(step, rid, m.Resume(rid), "resume")
                self.table.routes[rid].paused = False
            elif kind == "cancel":
                self._cancel(step, rid, now_s)
            elif kind == "transfer_kv":
                self._transfer(step, command.transfer_kv)
            elif kind == "start_decode":
                self._start_decode(step, command.start_decode)
            elif kind == "shutdown":
                step.shutdown = command.shutdown
            else:
                raise CommandError(f"command has no known kind (got {kind!r})")
        except CommandError as exc:
            step.error = str(exc)
            retryable = isinstance(exc, _Retryable)
            # A refused StartDecode names its instance (the control plane matches it exactly).
            target = command.start_decode.instance_id if kind == "start_decode" else ""
            step.events.append(
                failed_event(rid, target, f"{kind or 'command'}: {exc}", retryable, now_s)
            )
        return step

    def _start_prefill(
        self,
        step: Step,
        cmd: cluster_pb2.StartPrefill,
        budget_tokens: int | None,
        batch_tokens: int = 0,
    ) -> None:
        if not cmd.request_id:
            raise CommandError("request_id must not be empty")
        if self.draining:
            raise _Retryable(f"node {self.node.node_id} is draining; run it elsewhere")
        if cmd.request_id in self.table.routes:
            raise CommandError(f"request_id {cmd.request_id!r} is already resident here")
        if not cmd.prompt_token_ids:
            raise CommandError("prompt_token_ids must not be empty")
        if cmd.max_new_tokens < 1:
            raise CommandError(f"max_new_tokens must be >= 1, got {cmd.max_new_tokens}")
        if not cmd.instance_ids:
            raise CommandError("instance_ids must not be empty")
        if len(set(cmd.instance_ids)) != len(cmd.instance_ids):
            raise CommandError(f"instance_ids repeat an instance: {list(cmd.instance_ids)}")
        indices = self._members(cmd)
        eos_token_ids = self.eos_token_ids[indices[0]]
        assert eos_token_ids is not None, f"worker {indices[0]} is not ready"
        generated = tuple(cmd.generated_token_ids)
        remaining = cmd.max_new_tokens - len(generated)
        if remaining < 1:
            raise CommandError(
                f"generated_token_ids has {len(generated)} tokens: nothing left of "
                f"max_new_tokens={cmd.max_new_tokens}"
            )
        try:
            sampling = convert.sampling_from_proto(cmd.sampling, remaining, eos_token_ids)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        chunk = cmd.chunk_tokens or DEFAULT_CHUNK_TOKENS
        if budget_tokens is not None:
            chunk = min(chunk, budget_tokens)
        prompt = tuple(cmd.prompt_token_ids) + generated
        if len(cmd.instance_ids) > 1:
            self._start_sp(step, cmd, indices, prompt, sampling, chunk, len(generated))
            return
        index = indices[0]
        self.table.routes[cmd.request_id] = Route(
            {index}, len(generated), len(cmd.prompt_token_ids)
        )
        step.send(
            index,
            m.Prefill(
                request_id=cmd.request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                chunk_tokens=chunk,
                decode_in_place=cmd.decode_in_place,
                batch_tokens=batch_tokens,
            ),
        )

    def _start_sp(
        self,
        step: Step,
        cmd: cluster_pb2.StartPrefill,
        indices: list[int],
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        chunk: int,
        offset: int,
    ) -> None:
        """Every member of an SP group on this node gets its SpPrefill, in rank order."""
        node = self.node
        if not cmd.decode_in_place:
            raise CommandError(
                "decode_in_place must be set for an SP group (its sharded KV decodes in place)"
            )
        on_cuda = node.device == "cuda"
        devices = [f"cuda:{node.device_indices[i]}" for i in indices] if on_cuda else []
        shared = shared_devices(tuple(devices))
        if shared:
            raise CommandError(
                f"SP group {list(cmd.instance_ids)} shares GPU(s) {', '.join(shared)}: NCCL "
                "cannot put two ranks of one group on one GPU (run SP over distinct GPUs)"
            )
        self.sp_groups += 1
        group_id = cmd.group_id or f"sp/{cmd.request_id}/{node.node_id}/{self.sp_groups}"
        lead = node.index_of(cmd.instance_ids[0])  # None: rank 0 is on another node
        followers = {index for index in indices if index != lead}
        route = Route(set(indices), offset, len(cmd.prompt_token_ids), followers=followers)
        self.table.routes[cmd.request_id] = route
        for index in indices:
            step.send(
                index,
                m.SpPrefill(
                    request_id=cmd.request_id,
                    prompt_token_ids=prompt,
                    sampling=sampling,
                    chunk_tokens=chunk,
                    ring=cmd.sp_kind == common_pb2.SP_KIND_RING,
                    group_id=group_id,
                    member_ids=tuple(cmd.instance_ids),
                    store_address=cmd.rendezvous_address or node.rendezvous_address,
                ),
            )

    def _members(self, cmd: cluster_pb2.StartPrefill) -> list[int]:
        """The worker indices of this node's members, in rank order (at least one).

        Members on other nodes are allowed only in an SP group that names where to meet
        (`rendezvous_address`) and its id (`group_id`), the same on every node."""
        node = self.node
        spans = len(cmd.instance_ids) > 1 and bool(cmd.rendezvous_address and cmd.group_id)
        indices = []
        for i, member in enumerate(cmd.instance_ids):
            index = node.index_of(member)
            if index is not None:
                indices.append(index)
            elif not spans:
                hint = " (an SP group spanning nodes needs rendezvous_address and group_id)"
                raise CommandError(
                    f"instance_ids[{i}] {member!r} is not an instance of node "
                    f"{node.node_id!r}" + (hint if len(cmd.instance_ids) > 1 else "")
                )
        if not indices:
            raise CommandError(
                f"no instance of instance_ids {list(cmd.instance_ids)} is on node {node.node_id!r}"
            )
        return indices

    def _route(self, request_id: str, what: str) -> Route:
        route = self.table.routes.get(request_id)
        if route is None:
            raise _Retryable(f"request {request_id!r} is not resident on this node ({what})")
        return route

    def _to_holders(self, step: Step, request_id: str, cmd: m.WorkerCommand, what: str) -> None:
        for index in sorted(self._route(request_id, what).workers):
            step.send(index, cmd)

    def _cancel(self, step: Step, request_id: str, now_s: float) -> None:
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

    def _transfer(self, step: Step, cmd: cluster_pb2.TransferKv) -> None:
        node, table = self.node, self.table
        if not cmd.transfer_id:
            raise CommandError("transfer_id must not be empty")
        if cmd.timeout_s < 0:
            raise CommandError(f"timeout_s must be >= 0, got {cmd.timeout_s}")
        src, dst = node.index_of(cmd.source_instance_id), node.index_of(cmd.destination_instance_id)
        if src is None and dst is None:
            raise CommandError(
                f"neither source_instance_id {cmd.source_instance_id!r} nor "
                f"destination_instance_id {cmd.destination_instance_id!r} is on this node"
            )
        if src is not None and src == dst:
            raise CommandError("source_instance_id equals destination_instance_id")
        store = cmd.rendezvous_address or node.rendezvous_address
        group_id = cmd.group_id or f"kv/{cmd.transfer_id}"
        timeout_s = cmd.timeout_s or node.group_timeout_s
        route = table.routes.get(cmd.request_id)
        if src is not None:
            if route is None or src not in route.workers:
                raise _Retryable(
                    f"request {cmd.request_id!r} is not resident on {cmd.source_instance_id}"
                )
        elif route is None:
            route = table.routes[cmd.request_id] = Route(set(), 0, 0)
        table.transfers[cmd.transfer_id] = TransferInfo(
            cmd.request_id, cmd.source_instance_id, cmd.destination_instance_id
        )
        args = (cmd.request_id, cmd.transfer_id, group_id)
        same_node = src is not None and dst is not None  # CUDA: IPC between the two workers
        if src is not None:
            step.send(
                src, m.SendKv(*args, cmd.destination_instance_id, store, timeout_s, same_node)
            )
        if dst is not None:
            route.workers.add(dst)
            step.send(dst, m.RecvKv(*args, cmd.source_instance_id, store, timeout_s, same_node))

    def _start_decode(self, step: Step, cmd: cluster_pb2.StartDecode) -> None:
        route = self._route(cmd.request_id, "start_decode")
        info = self.table.transfers.get(cmd.transfer_id) if cmd.transfer_id else None
        if cmd.instance_id:
            index = self.node.index_of(cmd.instance_id)
            if index is None:
                raise CommandError(
                    f"instance_id {cmd.instance_id!r} is not an instance of node "
                    f"{self.node.node_id!r}"
                )
            if index not in route.workers:
                raise _Retryable(f"request {cmd.request_id!r} is not on {cmd.instance_id}")
        elif info is not None:
            index = self.node.index_of(info.destination_id)
            if index is None:
                raise CommandError(f"transfer {cmd.transfer_id!r} ends on another node")
        elif len(route.workers) == 1:
            index = next(iter(route.workers))
        else:
            raise CommandError(f"transfer_id {cmd.transfer_id!r} is unknown here")
        if route.prompt_tokens == 0 and cmd.generated_token_ids:
            # KV from another node: it carries exactly the first generated token.
            route.offset_tokens = len(cmd.generated_token_ids) - 1
        step.send(index, m.StartDecode(cmd.request_id))

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
        if isinstance(report, m.TransferUpdate):
            info = table.transfers.get(report.transfer_id)
            if info is None or not self._transfer_report(index, report):
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
        elif isinstance(report, m.ChunkDone):
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

    def _transfer_report(self, index: int, report: m.TransferUpdate) -> bool:
        """Bookkeeping of a transfer report; True when it becomes an event."""
        table = self.table
        if report.state == "failed":
            if not report.is_source:
                # The receiver freed its partial import. With nothing of the request left here
                # (the source is elsewhere), a later StartPrefill or TransferKv finds no route.
                table.release(report.request_id, index)
            if report.transfer_id in table.failed_transfers:
                return False
            table.failed_transfers.add(report.transfer_id)
            return True
        if report.state == "done":
            if report.is_source:
                table.release(report.request_id, index)  # the source copy is freed
                return False
            return True
        return report.is_source  # "transferring": once, from the sender

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


_Progress = m.ChunkDone | m.PrefillDone | m.Paused | m.Tokens | m.Finished  # rank 0 reports it


def request_id_of(command: cluster_pb2.Command) -> str:
    """The request a command is about ("" for Shutdown and commands of no known kind)."""
    kind = command.WhichOneof("kind")
    if kind == "colocate":
        return command.colocate.prefill.request_id
    body = getattr(command, kind) if kind else None
    return str(getattr(body, "request_id", ""))


def failed_event(
    request_id: str, instance_id: str, error: str, retryable: bool, now_s: float
) -> cluster_pb2.Event:
    """A Failed event."""
    event = cluster_pb2.Event(request_id=request_id, instance_id=instance_id, at_s=now_s)
    event.failed.CopyFrom(convert.failed_proto(error, retryable))
    return event


def cancelled_event(request_id: str, now_s: float) -> cluster_pb2.Event:
    """A Cancelled event."""
    event = cluster_pb2.Event(request_id=request_id, at_s=now_s)
    event.cancelled.CopyFrom(cluster_pb2.Cancelled())
    return event
