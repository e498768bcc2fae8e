"""Where the members of an SP group meet: `rendezvous_for`, and the StartPrefill orders the
tick sends to the nodes of a group that spans two of them."""

from __future__ import annotations

from controlplane.core.policies.registry import make_policy
from controlplane.core.types import InstanceRole, InstanceSpec, RequestClass, RequestSpec
from controlplane.runtime.commands import PrefillOrder
from controlplane.runtime.dispatch import rendezvous_for
from controlplane.runtime.inputs import NodeJoin, PendingSubmit, TickInput
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

NODES = {"a0": "node-a", "a1": "node-a", "b0": "node-b"}


def test_members_meet_at_the_store_of_the_first_member_whose_node_has_one() -> None:
    stores = {"node-a": "10.0.0.1:700", "node-b": "10.0.0.2:700"}
    assert rendezvous_for(("b0", "a0", "a1"), NODES, stores) == "10.0.0.2:700"  # rank 0's
    assert rendezvous_for(("a0", "b0"), NODES, stores) == "10.0.0.1:700"
    assert rendezvous_for(("b0", "a0"), NODES, {"node-a": "10.0.0.1:700"}) == "10.0.0.1:700"
    assert rendezvous_for(("gone", "b0"), NODES, stores) == "10.0.0.2:700"  # left meanwhile
    assert rendezvous_for(("a0", "b0"), NODES, {}) == ""


def join(node_id: str, store: str, *instance_ids: str) -> NodeJoin:
    """A node with general instances of 4096 KV tokens each, its store at `store`."""
    records = tuple(
        RegisteredInstance(
            InstanceSpec(iid, node_id, InstanceRole.GENERAL, 1, 4096), InstanceState.UP, (), 0.0
        )
        for iid in instance_ids
    )
    return NodeJoin(NodeRecord(node_id, store, NodeState.UP, 0.0, 0.0), records, store)


def test_an_sp_group_over_two_nodes_gets_one_order_per_node_naming_one_store() -> None:
    # Prepare: one instance per node; a long prompt that needs the KV of both
    repo, state = InMemoryRepository(), RuntimeState()
    ticker = Ticker(make_policy("pecsched"), repo, state, Telemetry.noop(), transfer_timeout_s=30)
    nodes = [join("node-a", "10.0.0.1:700", "a0"), join("node-b", "10.0.0.2:700", "b0")]
    assert not ticker.run(TickInput(0.0, [], nodes)).commands
    spec = RequestSpec("long", "t", 6000, 4, 0, 0.0)
    submit = PendingSubmit(NewRequest(spec, RequestClass.LONG, [1] * 6000), None)
    # Execute
    commands = ticker.run(TickInput(0.1, [submit], [])).commands
    # Assert: both nodes are told the whole group in rank order and meet at rank 0's store
    assert sorted(c.node_id for c in commands) == ["node-a", "node-b"]
    order = commands[0].order
    assert all(c.order is order for c in commands), "one order, sent to each node"
    assert isinstance(order, PrefillOrder)
    assert order.instance_ids == ("a0", "b0") and order.decode_in_place
    assert order.rendezvous_address == "10.0.0.1:700"


def test_group_ids_differ_between_control_plane_processes() -> None:
    # A restarted control plane numbers attempts from 0 again, and a worker refuses a group id
    # it has already destroyed: the same request's first prefill after a restart must carry a
    # group id no earlier process used.
    def first_group_id() -> str:
        repo, state = InMemoryRepository(), RuntimeState()
        ticker = Ticker(
            make_policy("pecsched"), repo, state, Telemetry.noop(), transfer_timeout_s=30
        )
        nodes = [join("node-a", "10.0.0.1:700", "a0"), join("node-b", "10.0.0.2:700", "b0")]
        ticker.run(TickInput(0.0, [], nodes))
        spec = RequestSpec("long", "t", 6000, 4, 0, 0.0)
        submit = PendingSubmit(NewRequest(spec, RequestClass.LONG, [1] * 6000), None)
        (command, *_) = ticker.run(TickInput(0.1, [submit], [])).commands
        assert isinstance(command.order, PrefillOrder)
        return command.order.group_id

    assert first_group_id() != first_group_id()
