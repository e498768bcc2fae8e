"""The agent's brain: routes commands to workers, turns reports into events, registers,
heartbeats, drains. Single-threaded: `handle(item)` and `tick(now_s)` are called from the
agent's main loop only, with inputs from the link (`Connected`, `ControlIn`, `Disconnected`),
the supervisor (`WorkerSaid`, `WorkerDied`) and the clock.

Request routes: every request this node holds has a route (which workers hold it, the tokens
generated before a re-queue, the prompt length). Reports for requests without a route are
dropped, which de-duplicates the replies of several workers. A Cancel retires the route at
once (`cancelling` remembers the workers yet to answer), so the request can be placed here
again by the next command. Events produced while no stream is registered are buffered (in
order) and sent after the next `Registered`.

Commands are validated here; an invalid one becomes a `Failed` event naming the field, and
the agent keeps running. Wire semantics (Tokens include the first token, transfer DONE only
once the destination holds all the KV, ...) are documented in `dataplane.agent.commands`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Protocol

from opentelemetry import trace

from dataplane.agent import convert
from dataplane.agent.commands import CommandRouter
from dataplane.agent.config import AgentConfig
from dataplane.agent.link import Connected, ControlIn, Disconnected
from dataplane.agent.routes import Route, TransferInfo
from dataplane.agent.supervisor import WorkerDied, WorkerSaid
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2

MAX_BUFFERED_EVENTS = 100_000

log = logging.getLogger("pecsched.agent")


class Ports(Protocol):
    """What the core drives: worker pipes, respawns and the wire."""

    def send_worker(self, index: int, cmd: m.WorkerCommand) -> bool:
        """Queue a command for a worker; False if it is gone."""

    def respawn(self, index: int) -> None:
        """Start a fresh worker in slot `index`."""

    def send_wire(self, epoch: int, message: cluster_pb2.AgentMessage) -> bool:
        """Send on stream `epoch`; False if that stream is gone."""


class AgentCore:
    """See the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        ports: Ports,
        rendezvous_address: str,
        version: str,
        device_indices: list[int],
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.config = config
        self.tracer = tracer or trace.NoOpTracer()  # one span per command (dataplane.agent.tracing)
        self.device_indices = device_indices  # per worker: GPU index (CPU: the worker index)
        self.ports = ports
        self.rendezvous_address = rendezvous_address
        self.version = version
        n = config.num_workers
        self.ready: list[m.Ready | None] = [None] * n
        self.generations = [0] * n
        self.loads: list[m.Load | None] = [None] * n
        self.busy_reported_s = [0.0] * n
        self.routes: dict[str, Route] = {}
        self.cancelling: dict[str, set[int]] = {}  # request -> workers yet to answer a Cancel
        self.transfers: dict[str, TransferInfo] = {}
        self.failed_transfers: set[str] = set()
        self.epoch: int | None = None
        self.registered = False
        self.heartbeat_interval_s = 1.0
        self.next_heartbeat_s = 0.0
        self.buffer: deque[cluster_pb2.Event] = deque(maxlen=MAX_BUFFERED_EVENTS)
        self.seq = 0
        self.last_control_seq = 0
        self.draining = False
        self.drain_deadline_s = 0.0
        self.finished = False  # the agent may exit now
        self.fatal: str | None = None  # set when a worker could not start: the agent must exit
        self.commands = CommandRouter(self)

    # ------------------------------------------------------------------ identities
    def instance_id(self, index: int) -> str:
        """Instance id of worker `index`."""
        return self.config.instance_id(index)

    def index_of(self, instance_id: str) -> int | None:
        """Worker index of one of this node's instance ids, else None."""
        prefix = f"{self.config.node_id}/"
        if not instance_id.startswith(prefix):
            return None
        tail = instance_id[len(prefix) :]
        if not tail.isdigit() or int(tail) >= self.config.num_workers:
            return None
        return int(tail)

    @property
    def all_ready(self) -> bool:
        """Every worker has reported Ready at least once."""
        return all(r is not None for r in self.ready)

    # ------------------------------------------------------------------ inputs
    def handle(self, item: object) -> None:
        """Apply one input from the link or the supervisor."""
        if isinstance(item, WorkerSaid):
            if item.generation == self.generations[item.index]:
                self._on_report(item.index, item.report)
        elif isinstance(item, WorkerDied):
            if item.generation == self.generations[item.index]:
                self._on_worker_died(item.index, item.exit_code)
        elif isinstance(item, Connected):
            self.epoch, self.registered, self.last_control_seq = item.epoch, False, 0
            self._send(cluster_pb2.AgentMessage(register=self.register_message()))
        elif isinstance(item, Disconnected):
            if item.epoch == self.epoch:
                self.epoch, self.registered = None, False
        elif isinstance(item, ControlIn):
            if item.epoch == self.epoch:
                self._on_control(item.message)

    def tick(self, now_s: float) -> None:
        """Heartbeats and the drain deadline."""
        if self.registered and now_s >= self.next_heartbeat_s:
            self.next_heartbeat_s = now_s + self.heartbeat_interval_s
            self._send(cluster_pb2.AgentMessage(heartbeat=self.heartbeat()))
        idle = not (self.routes or self.cancelling)
        if self.draining and (idle or now_s >= self.drain_deadline_s):
            self.hand_back_all("agent drained: the request was handed back")
            self.finished = True

    # ------------------------------------------------------------------ control plane
    def _on_control(self, msg: cluster_pb2.ControlMessage) -> None:
        if msg.seq and msg.seq <= self.last_control_seq:
            return  # a duplicate after a retransmission
        self.last_control_seq = max(self.last_control_seq, msg.seq)
        body = msg.WhichOneof("body")
        if body == "registered":
            self._on_registered(msg.registered)
        elif body == "command":
            self.commands.dispatch(msg.command)

    def _on_registered(self, reg: cluster_pb2.Registered) -> None:
        if reg.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = reg.heartbeat_interval_s
        for rid in reg.drop_request_ids:
            route = self.routes.pop(rid, None)
            if route is not None:
                for index in route.workers:
                    self.ports.send_worker(index, m.Cancel(rid, silent=True))
        self.registered = True
        self.next_heartbeat_s = 0.0
        while self.buffer and self.registered:
            event = self.buffer.popleft()
            if not self._send(cluster_pb2.AgentMessage(event=event)):
                self.buffer.appendleft(event)
                break

    def register_message(self) -> cluster_pb2.Register:
        """This node's Register: instances, rendezvous store, resident requests."""
        instances = []
        for index, ready in enumerate(self.ready):
            assert ready is not None, f"worker {index} is not ready"
            instances.append(
                convert.instance_spec_to_proto(
                    self.instance_id(index),
                    self.config.roles[index],
                    self.device_indices[index],
                    ready,
                )
            )
        return cluster_pb2.Register(
            node_id=self.config.node_id,
            model=self.config.model,
            instances=instances,
            rendezvous_address=self.rendezvous_address,
            resident_request_ids=sorted(self.routes),
            agent_version=self.version,
            vocab_size=max((r.vocab_size for r in self.ready if r is not None), default=0),
        )

    def heartbeat(self) -> cluster_pb2.Heartbeat:
        """Loads of every instance; busy_s since the previous heartbeat."""
        loads = []
        for index, load in enumerate(self.loads):
            busy_s = 0.0
            if load is not None:
                busy_s = max(0.0, load.busy_total_s - self.busy_reported_s[index])
                self.busy_reported_s[index] = load.busy_total_s
            loads.append(
                cluster_pb2.InstanceLoad(
                    instance_id=self.instance_id(index),
                    kv_used_tokens=0 if load is None else load.kv_used_tokens,
                    running_requests=0 if load is None else load.running_requests,
                    busy_s=busy_s,
                )
            )
        return cluster_pb2.Heartbeat(loads=loads)

    # ------------------------------------------------------------------ outputs
    def _send(self, message: cluster_pb2.AgentMessage) -> bool:
        if self.epoch is None:
            return False
        self.seq += 1
        message.seq = self.seq
        return self.ports.send_wire(self.epoch, message)

    def emit(self, event: cluster_pb2.Event) -> None:
        """Send an event now, or buffer it until the next registration."""
        if not (self.registered and self._send(cluster_pb2.AgentMessage(event=event))):
            self.buffer.append(event)

    def emit_failed(self, request_id: str, instance_id: str, error: str, retryable: bool) -> None:
        """A Failed event."""
        event = cluster_pb2.Event(request_id=request_id, instance_id=instance_id, at_s=time.time())
        event.failed.CopyFrom(convert.failed_proto(error, retryable))
        self.emit(event)

    # ------------------------------------------------------------------ workers
    def _on_report(self, index: int, report: m.WorkerReport) -> None:
        if isinstance(report, m.Ready):
            self.ready[index] = report
            log.info(
                "worker %s ready: pid %d, %d KV tokens, %s",
                self.instance_id(index),
                report.pid,
                report.kv_capacity_tokens,
                report.device,
            )
            return
        if isinstance(report, m.Load):
            self.loads[index] = report
            return
        self.commands.on_report(index, report)

    def _on_worker_died(self, index: int, exit_code: int | None) -> None:
        instance_id = self.instance_id(index)
        if self.ready[index] is None:
            self.fatal = f"worker {instance_id} exited (code {exit_code}) before it was ready"
            return
        for rid in sorted(rid for rid, r in self.routes.items() if index in r.workers):
            route = self.routes.pop(rid)
            for other in route.workers - {index}:
                self.ports.send_worker(other, m.Cancel(rid, silent=True))
            self.emit_failed(
                rid, instance_id, f"instance {instance_id} died (exit code {exit_code})", True
            )
        for rid in sorted(rid for rid, waiting in self.cancelling.items() if index in waiting):
            self.commands.cancel_answered(rid, index)  # the dead worker holds nothing
        self.loads[index] = None
        self.generations[index] += 1
        if not (self.finished or self.draining):
            self.ports.respawn(index)

    # ------------------------------------------------------------------ drain
    def start_drain(self, now_s: float) -> None:
        """Stop taking new work; paused requests are handed back at once."""
        if self.draining:
            return
        self.draining = True
        self.drain_deadline_s = now_s + self.config.drain_timeout_s
        for rid in sorted(rid for rid, r in self.routes.items() if r.paused):
            self.hand_back(rid, "agent draining: paused request handed back")

    def hand_back(self, request_id: str, reason: str) -> None:
        """Free a request on every worker here and report it Failed(retryable)."""
        route = self.routes.pop(request_id)
        for index in sorted(route.workers):
            self.ports.send_worker(index, m.Cancel(request_id, silent=True))
        first = min(route.workers) if route.workers else 0
        self.emit_failed(request_id, self.instance_id(first), reason, True)

    def hand_back_all(self, reason: str) -> None:
        """`hand_back` every request this node still holds."""
        for rid in sorted(self.routes):
            self.hand_back(rid, reason)
