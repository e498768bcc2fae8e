"""What the event loop hands the tick thread, and what it gets back (plain values)."""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.core.types import ClusterView, RequestView
from controlplane.runtime.commands import AgentCommand
from controlplane.runtime.reports import AgentReport
from controlplane.runtime.tokens import TokenLog
from controlplane.store.records import NewRequest, NodeRecord, RegisteredInstance
from controlplane.telemetry import TraceContext


@dataclass(frozen=True, slots=True)
class PendingSubmit:
    """A validated submit waiting for the next commit."""

    new: NewRequest  # what to persist
    trace: TraceContext | None  # the submit span's context (parent of the request's spans)


@dataclass(frozen=True, slots=True)
class CancelAsk:
    """A client or admin cancels a request."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeJoin:
    """An agent registered its node and instances."""

    node: NodeRecord
    instances: tuple[RegisteredInstance, ...]
    rendezvous_address: str


@dataclass(frozen=True, slots=True)
class NodeLeave:
    """An agent was lost (stream closed or heartbeats missed)."""

    node_id: str
    instance_ids: tuple[str, ...]
    reason: str


Happening = AgentReport | CancelAsk | NodeJoin | NodeLeave


@dataclass(slots=True)
class TickInput:
    """Everything one tick applies, in the order it happened."""

    now_s: float
    submits: list[PendingSubmit] = field(default_factory=list)
    happenings: list[Happening] = field(default_factory=list)
    heartbeats: dict[str, float] = field(default_factory=dict)  # node -> last message time
    want_snapshot: bool = False


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What became of one submit: the stored view, or why admission refused it."""

    view: RequestView | None  # None when refused
    created: bool  # False for an idempotent replay
    refusal: str = ""  # why refused (the cluster can never hold it)
    key_reused: bool = False  # refused: its idempotency key names a request of other content


@dataclass(slots=True)
class TickOutput:
    """The committed results of one tick."""

    submits: list[SubmitOutcome] = field(default_factory=list)  # one per TickInput.submits
    cancels: dict[str, RequestView] = field(default_factory=dict)  # cancelled request views
    commands: list[AgentCommand] = field(default_factory=list)  # to dispatch, in order
    views: list[RequestView] = field(default_factory=list)  # persisted views
    new_logs: dict[str, TokenLog] = field(default_factory=dict)  # logs of new requests
    touched_logs: list[str] = field(default_factory=list)  # requests with new tokens
    snapshot: ClusterView | None = None  # cluster view when asked for
    num_active: int = 0  # unfinished requests after the tick
    tenant_active: dict[str, int] = field(default_factory=dict)  # unfinished by tenant
    tenant_prompt_bytes: dict[str, int] = field(default_factory=dict)  # held prompts by tenant
    decision_s: float = 0.0  # policy.schedule() wall time
    num_actions: int = 0  # actions decided
