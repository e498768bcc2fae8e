"""Attached agents (event-loop side): one `AgentSession` per node with an outbound queue.

A session lives from a successful Register until its stream closes, it misses 3 heartbeats,
or the same node registers again (the newer stream wins). Losing a session turns into a
`NodeLeave`, so the policy re-queues the node's work. Instance ids are unique across live
nodes: a node registering an instance another live node holds is refused.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from controlplane.runtime.commands import AgentCommand
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.runtime.inputs import NodeLeave


@dataclass(frozen=True, slots=True)
class Registration:
    """What a node's Register said (validated by the API layer)."""

    node_id: str
    model: str
    instance_ids: tuple[str, ...]
    rendezvous_address: str
    resident_request_ids: tuple[str, ...]
    vocab_size: int | None = None  # of the served model; None when the agent did not say


# Outbound items: a command, or None meaning "close the stream" (the session was lost).
Outbound = AgentCommand | None


class AgentSession:
    """One attached agent: its registration, liveness and outbound commands."""

    def __init__(self, registration: Registration, now_s: float) -> None:
        self.registration = registration
        self.last_seen_s = now_s  # last message of any kind
        self.last_seq = 0  # highest AgentMessage.seq applied (0 = none yet)
        self.closed_reason = ""  # set once lost; nothing is accepted from it afterwards
        self.outbox: asyncio.Queue[Outbound] = asyncio.Queue()

    @property
    def node_id(self) -> str:
        """The node this agent runs on."""
        return self.registration.node_id

    @property
    def is_live(self) -> bool:
        """True until the session is lost."""
        return not self.closed_reason

    def accept_seq(self, seq: int) -> bool:
        """False for a duplicate (seq not above the last applied); seq 0 is always accepted."""
        if seq == 0:
            return True
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def send(self, command: AgentCommand) -> None:
        """Queue a command for the stream (dropped once lost)."""
        if self.is_live:
            self.outbox.put_nowait(command)


class AgentRegistry:
    """Live sessions by node, and which node holds each instance."""

    def __init__(self, model: str | None) -> None:
        self.model = model  # cluster model; fixed by the first registration when None
        self.vocab_size: int | None = None  # its vocabulary, from the first agent that says
        self._sessions: dict[str, AgentSession] = {}
        self._owner: dict[str, str] = {}  # instance id -> node id

    def attach(
        self, registration: Registration, now_s: float
    ) -> tuple[AgentSession, NodeLeave | None]:
        """Register a node; returns its session and the leave of its previous session if any.

        Raises:
            RuntimeServiceError: AGENT_REJECTED when the model or its vocabulary size
                differs from the cluster's, or an instance id is held by another live node.
        """
        if self.model is not None and registration.model != self.model:
            raise RuntimeServiceError(
                RuntimeErrorCode.AGENT_REJECTED,
                f"node {registration.node_id!r} serves model {registration.model!r}, "
                f"the cluster serves {self.model!r}",
                field="model",
            )
        vocab = registration.vocab_size
        if vocab is not None and self.vocab_size is not None and vocab != self.vocab_size:
            raise RuntimeServiceError(
                RuntimeErrorCode.AGENT_REJECTED,
                f"node {registration.node_id!r} reports a vocabulary of {vocab} tokens, "
                f"the cluster's model has {self.vocab_size}",
                field="vocab_size",
            )
        for iid in registration.instance_ids:
            owner = self._owner.get(iid)
            if owner is not None and owner != registration.node_id:
                raise RuntimeServiceError(
                    RuntimeErrorCode.AGENT_REJECTED,
                    f"instance {iid!r} is already registered by live node {owner!r}",
                    field="instances",
                )
        previous = self._sessions.get(registration.node_id)
        leave = self.lose(previous, "node registered again") if previous else None
        if self.model is None:
            self.model = registration.model
        if self.vocab_size is None:
            self.vocab_size = vocab
        session = AgentSession(registration, now_s)
        self._sessions[registration.node_id] = session
        for iid in registration.instance_ids:
            self._owner[iid] = registration.node_id
        return session, leave

    def lose(self, session: AgentSession, reason: str) -> NodeLeave | None:
        """Declare `session` lost (idempotent); returns the leave to apply, once."""
        if not session.is_live:
            return None
        session.closed_reason = reason
        session.outbox.put_nowait(None)
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            for iid in session.registration.instance_ids:
                if self._owner.get(iid) == session.node_id:
                    del self._owner[iid]
        return NodeLeave(session.node_id, session.registration.instance_ids, reason)

    def session(self, node_id: str) -> AgentSession | None:
        """The live session of a node."""
        return self._sessions.get(node_id)

    def sessions(self) -> list[AgentSession]:
        """Every live session."""
        return list(self._sessions.values())

    def expired(self, now_s: float, heartbeat_interval_s: float) -> list[AgentSession]:
        """Live sessions that have been silent for 3 heartbeat intervals."""
        limit = 3 * heartbeat_interval_s
        return [s for s in self._sessions.values() if now_s - s.last_seen_s > limit]
