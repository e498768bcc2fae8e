"""The vocabulary of the agent's command router (`dataplane.agent.commands`) and its parts:
the node it runs on, the `Step` each input returns, refused commands, and the events the
router writes itself (Failed, Cancelled). Pure: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataplane.agent import convert
from dataplane.agent.config import instance_id
from dataplane.agent.routes import RequestTable, Route
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2


class CommandError(ValueError):
    """An invalid command; the message names the field."""


class Retryable(CommandError):
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


def resident_route(table: RequestTable, request_id: str, what: str) -> Route:
    """The request's route; Retryable (naming the command `what`) when it has none here."""
    route = table.routes.get(request_id)
    if route is None:
        raise Retryable(f"request {request_id!r} is not resident on this node ({what})")
    return route


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
