"""The tick's KV-transfer bookkeeping (Ticker + RuntimeState with the pecsched policy and the
in-memory repository): a transfer the policy has given up on never reaches it again."""

from __future__ import annotations

from controlplane.core.policies.registry import make_policy
from controlplane.core.types import InstanceRole, InstanceSpec, RequestClass, RequestSpec
from controlplane.core.types import RequestState as S
from controlplane.runtime.commands import DecodeOrder, PrefillOrder, TransferOrder
from controlplane.runtime.inputs import Happening, NodeJoin, NodeLeave, PendingSubmit, TickInput
from controlplane.runtime.reports import AgentReport, Failed, PrefillDone
from controlplane.runtime.state import RuntimeState
from controlplane.runtime.ticker import Ticker
from controlplane.store.memory import InMemoryRepository
from controlplane.store.records import (
    InstanceState,
    NewRequest,
    NodeRecord,
    NodeState,
    RegisteredInstance,
)
from controlplane.telemetry import Telemetry

_DECODE = InstanceRole.SHORT_DECODE
_GENERAL = InstanceRole.GENERAL
TIMEOUT_S = 60.0  # the agents' transfer timeout; the runtime gives up after 1.5 x + 1 s


class Cluster:
    """A ticker over node-b (b0, b1: general) and node-a (a1: short decode); one short
    request "r".

    Not a fake data plane: the test writes the agents' reports itself, at the tick's level
    (`AgentReport`s in, orders out) with time passed in, so a transfer's expiry (1.5 x 60 s +
    1 s) is reached without waiting for it. The agent over the wire is played by SimAgent
    (tests/integration/controlplane/cp_sim_agent.py) against a whole control plane."""

    def __init__(self) -> None:
        self.repo = InMemoryRepository()
        self.state = RuntimeState()
        self.ticker = Ticker(
            make_policy("pecsched"),
            self.repo,
            self.state,
            Telemetry.noop(),
            transfer_timeout_s=TIMEOUT_S,
        )

    def tick(
        self, now_s: float, *happenings: Happening, submits: tuple[PendingSubmit, ...] = ()
    ) -> list[object]:
        """One tick, with what the event loop does after it; returns the orders to dispatch."""
        out = self.ticker.run(TickInput(now_s, list(submits), list(happenings)))
        for rid in out.touched_logs:
            self.state.requests[rid].log.publish()
        return [c.order for c in out.commands]

    def report(self, instance_id: str, body: object, now_s: float) -> AgentReport:
        node = "node-b" if instance_id.startswith("b") else "node-a"
        return AgentReport(node, "r", instance_id, body, now_s)  # type: ignore[arg-type]

    def transferring(self) -> TransferOrder:
        """Join both nodes, submit, prefill on b0: the KV goes to a1."""
        submit = PendingSubmit(
            NewRequest(RequestSpec("r", "t", 3, 5, 0, 0.0), RequestClass.SHORT, [1, 2, 3]), None
        )
        # b1 (less KV, so b0 takes the request) keeps node-b serving once a1 is gone
        node_b = join("node-b", ("b0", _GENERAL, 4096), ("b1", _GENERAL, 2048))
        nodes = (node_b, join("node-a", ("a1", _DECODE, 4096)))
        assert not self.tick(0.0, *nodes)
        orders = self.tick(0.1, submits=(submit,))
        assert [type(o) for o in orders] == [PrefillOrder]
        assert orders[0].instance_ids == ("b0",)  # type: ignore[attr-defined]
        return self.prefill_done(1.0)

    def prefill_done(self, now_s: float, instance_id: str = "b0") -> TransferOrder:
        orders = self.tick(now_s, self.report(instance_id, PrefillDone(7), now_s))
        order = orders[0]  # one per node: the source's and the destination's
        assert orders == [order, order], orders
        assert isinstance(order, TransferOrder) and order.destination_instance_id == "a1"
        return order

    def kinds(self) -> list[str]:
        return [e.kind.value for e in self.repo.list_events("r")]


def join(node_id: str, *instances: tuple[str, InstanceRole, int]) -> NodeJoin:
    """A node with instances (id, registered role, KV capacity)."""
    records = tuple(
        RegisteredInstance(InstanceSpec(iid, node_id, role, 1, kv), InstanceState.UP, (), 0.0)
        for iid, role, kv in instances
    )
    node = NodeRecord(node_id, "127.0.0.1:1", NodeState.UP, 0.0, 0.0)
    return NodeJoin(node, records, "127.0.0.1:2")


def test_decode_in_place_after_the_destination_died_forgets_the_transfer() -> None:
    # Prepare
    cluster = Cluster()
    cluster.transferring()
    # Execute: a1's node dies; no short-decode instance is left
    orders = cluster.tick(2.0, NodeLeave("node-a", ("a1",), "stream closed"))
    late = cluster.tick(2.0 + 3 * TIMEOUT_S)  # long past the transfer's expiry
    # Assert: it decodes on b0 at once, and the dead transfer never expires into the policy
    (decode,) = orders
    assert isinstance(decode, DecodeOrder)
    assert decode.instance_id == "b0" and decode.transfer_id == ""
    assert not cluster.state.transfers and not late
    assert "kv_transfer_failed" not in cluster.kinds()
    assert cluster.ticker.policy.request_view("r").state is S.DECODING


def test_expiry_of_a_transfer_before_a_requeue_does_not_fail_the_next_one() -> None:
    # Prepare: the first transfer to a1 starts at 1 s; the source fails, the request is re-queued
    cluster = Cluster()
    first = cluster.transferring()
    requeue = cluster.tick(2.0, cluster.report("b0", Failed("worker restarted", True), 2.0))
    assert [type(o).__name__ for o in requeue] == ["CancelOrder", "CancelOrder", "PrefillOrder"]
    (again,) = requeue[-1].instance_ids  # type: ignore[attr-defined]
    second = cluster.prefill_done(50.0, again)
    # Execute: past the first transfer's expiry, before the second's
    late = cluster.tick(1.0 + 1.5 * TIMEOUT_S + 5.0)
    # Assert: no report about the first can fail the second (no third transfer starts)
    assert first.transfer_id != second.transfer_id
    assert not late, late
    assert set(cluster.state.transfers) == {second.transfer_id}
    assert cluster.ticker.policy.request_view("r").state is S.TRANSFERRING_KV
    assert "kv_transfer_failed" not in cluster.kinds()


def test_refused_decode_in_place_requeues_the_request() -> None:
    """The source's copy was freed when its side of the transfer completed, just before the
    destination died: the agent refuses the StartDecode (a failure naming no instance)."""
    # Prepare
    cluster = Cluster()
    cluster.transferring()
    (decode,) = cluster.tick(2.0, NodeLeave("node-a", ("a1",), "stream closed"))
    assert isinstance(decode, DecodeOrder) and decode.instance_id == "b0"
    refusal = Failed("start_decode: request 'r' is not resident on this node", True)
    # Execute
    orders = cluster.tick(2.1, AgentReport("node-b", "r", "", refusal, 2.1))
    # Assert: re-queued and prefilled again (b0 refused it: on b1), after the first token
    assert cluster.ticker.policy.request_view("r").num_requeues == 1
    assert [type(o).__name__ for o in orders] == ["CancelOrder", "PrefillOrder"]
    prefill = orders[-1]
    assert isinstance(prefill, PrefillOrder) and prefill.instance_ids == ("b1",)
    assert prefill.generated_token_ids == (7,)
    assert "requeued" in cluster.kinds()


def test_refusal_from_a_node_the_request_is_not_on_is_stale() -> None:
    # Prepare
    cluster = Cluster()
    cluster.transferring()
    refusal = Failed("pause: request 'r' is not resident on this node", True)
    # Execute: node-a holds only the destination, which is not part of the placement yet
    orders = cluster.tick(2.0, AgentReport("node-a", "r", "", refusal, 2.0))
    # Assert
    assert not orders
    assert cluster.ticker.policy.request_view("r").state is S.TRANSFERRING_KV
