"""The agent's brain: routes commands to workers, turns reports into events, registers,
heartbeats, drains. Single-threaded: `handle(item)` and `tick(now_s)` are called from the
agent's main loop only, with inputs from the link (`Connected`, `ControlIn`, `Disconnected`),
the supervisor (`WorkerSaid`, `WorkerDied`) and the clock.

What happens to requests is decided by the `CommandRouter` (`dataplane.agent.commands`, which
also documents the wire semantics) over the node's `RequestTable` (`dataplane.agent.routes`):
the core feeds it commands, reports and worker deaths with the wall-clock time and carries out
the `Step` it returns (worker commands, events). An invalid command becomes a `Failed` event
naming the field, and the agent keeps running. Events produced while no stream is registered
are buffered (in order) and sent after the next `Registered`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from dataplane.agent import convert
from dataplane.agent.commands import CommandRouter
from dataplane.agent.config import AgentConfig
from dataplane.agent.link import Connected, ControlIn, Disconnected
from dataplane.agent.routes import RequestTable
from dataplane.agent.steps import Node, Step, request_id_of
from dataplane.agent.supervisor import WorkerDied, WorkerSaid
from dataplane.agent.tracing import WorkSpans, command_span
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
    """See the module docstring. `clock` gives the events' wall-clock time (default time.time)."""

    def __init__(
        self,
        config: AgentConfig,
        ports: Ports,
        rendezvous_address: str,
        version: str,
        device_indices: list[int],
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tracer = tracer or trace.NoOpTracer()  # one span per command (dataplane.agent.tracing)
        self.clock = clock
        self.ports = ports
        self.version = version
        self.node = Node(
            node_id=config.node_id,
            num_workers=config.num_workers,
            device=config.device,
            device_indices=tuple(device_indices),
            rendezvous_address=rendezvous_address,
            group_timeout_s=config.group_timeout_s,
        )
        self.table = RequestTable()
        self.router = CommandRouter(self.node, self.table)
        self.spans = WorkSpans(self.tracer, config.node_id, self.node.instance_id)
        n = config.num_workers
        self.ready: list[m.Ready | None] = [None] * n
        self.generations = [0] * n
        self.loads: list[m.Load | None] = [None] * n
        self.busy_reported_s = [0.0] * n
        self.epoch: int | None = None
        self.registered = False
        self.heartbeat_interval_s = 1.0
        self.next_heartbeat_s = 0.0
        self.buffer: deque[cluster_pb2.Event] = deque(maxlen=MAX_BUFFERED_EVENTS)
        self.seq = 0
        self.last_control_seq = 0
        self.drain_deadline_s = 0.0
        self.finished = False  # the agent may exit now
        self.fatal: str | None = None  # set when a worker could not start: the agent must exit

    @property
    def all_ready(self) -> bool:
        """Every worker has reported Ready at least once."""
        return all(r is not None for r in self.ready)

    @property
    def draining(self) -> bool:
        """The node takes no new work (a drain started)."""
        return self.router.draining

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
        """Heartbeats (with the pruning of transfers) and the drain deadline (`now_s`:
        monotonic clock)."""
        if self.registered and now_s >= self.next_heartbeat_s:
            self.next_heartbeat_s = now_s + self.heartbeat_interval_s
            self._send(cluster_pb2.AgentMessage(heartbeat=self.heartbeat()))
            self.table.forget_transfers()
        if self.draining and (self.table.idle or now_s >= self.drain_deadline_s):
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
            self._on_command(msg.command)

    def _on_command(self, command: cluster_pb2.Command) -> None:
        kind = command.WhichOneof("kind") or "unknown"
        span = command_span(self.tracer, command, kind, request_id_of(command), self.node.node_id)
        try:
            step = self.router.on_command(command, self.clock())
            if step.error is not None:
                span.set_attribute("pecsched.error", step.error)
            self._apply(step, trace.set_span_in_context(span))
            if step.shutdown is not None:
                self.start_drain(time.monotonic())
                if not step.shutdown.drain:
                    self.hand_back_all("agent shut down: the request was handed back")
        finally:
            span.end()

    def _on_registered(self, reg: cluster_pb2.Registered) -> None:
        if reg.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = reg.heartbeat_interval_s
        self._apply(self.router.drop(reg.drop_request_ids))
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
                    self.node.instance_id(index),
                    self.config.roles[index],
                    self.node.device_indices[index],
                    ready,
                )
            )
        return cluster_pb2.Register(
            node_id=self.config.node_id,
            model=self.config.model,
            instances=instances,
            rendezvous_address=self.node.rendezvous_address,
            resident_request_ids=self.table.resident(),
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
                    instance_id=self.node.instance_id(index),
                    kv_used_tokens=0 if load is None else load.kv_used_tokens,
                    running_requests=0 if load is None else load.running_requests,
                    busy_s=busy_s,
                )
            )
        return cluster_pb2.Heartbeat(loads=loads)

    # ------------------------------------------------------------------ outputs
    def _apply(self, step: Step, span_parent: otel_context.Context | None = None) -> None:
        """Carry out a router step: worker commands, then events; trace its work."""
        for index, cmd in step.to_workers:
            self.ports.send_worker(index, cmd)
        for event in step.events:
            self._emit(event)
        self.spans.observe(step, span_parent)

    def _send(self, message: cluster_pb2.AgentMessage) -> bool:
        if self.epoch is None:
            return False
        self.seq += 1
        message.seq = self.seq
        return self.ports.send_wire(self.epoch, message)

    def _emit(self, event: cluster_pb2.Event) -> None:
        """Send an event now, or buffer it until the next registration."""
        if not (self.registered and self._send(cluster_pb2.AgentMessage(event=event))):
            self.buffer.append(event)

    # ------------------------------------------------------------------ workers
    def _on_report(self, index: int, report: m.WorkerReport) -> None:
        if isinstance(report, m.Ready):
            self.ready[index] = report
            self.router.worker_ready(index, report.eos_token_ids)
            log.info(
                "worker %s ready: pid %d, %d KV tokens, %s",
                self.node.instance_id(index),
                report.pid,
                report.kv_capacity_tokens,
                report.device,
            )
            return
        if isinstance(report, m.Load):
            self.loads[index] = report
            return
        if isinstance(report, m.KvTransferUpdate):
            self.spans.transfer_report(report)
        self._apply(self.router.on_report(index, report, self.clock()))

    def _on_worker_died(self, index: int, exit_code: int | None) -> None:
        if self.ready[index] is None:
            instance_id = self.node.instance_id(index)
            self.fatal = f"worker {instance_id} exited (code {exit_code}) before it was ready"
            return
        self._apply(self.router.worker_died(index, exit_code, self.clock()))
        self.loads[index] = None
        self.generations[index] += 1
        if not (self.finished or self.draining):
            self.ports.respawn(index)

    # ------------------------------------------------------------------ drain
    def start_drain(self, now_s: float) -> None:
        """Stop taking new work; paused requests are handed back at once (`now_s`: monotonic)."""
        if self.draining:
            return
        self.drain_deadline_s = now_s + self.config.drain_timeout_s
        self._apply(self.router.start_drain(self.clock()))

    def hand_back_all(self, reason: str) -> None:
        """Free every request this node still holds and report each Failed(retryable)."""
        self._apply(self.router.hand_back(self.table.resident(), reason, self.clock()))
