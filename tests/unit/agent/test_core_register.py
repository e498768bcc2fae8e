"""The agent's Register carries the vocabulary size its workers' model reported."""

from __future__ import annotations

from dataplane.agent.config import AgentConfig
from dataplane.agent.core import AgentCore
from dataplane.agent.link import Connected
from dataplane.agent.supervisor import WorkerSaid
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2


class _Wire:
    """Ports that keep what goes on the wire."""

    def __init__(self) -> None:
        self.sent: list[cluster_pb2.AgentMessage] = []

    def send_worker(self, index: int, cmd: m.WorkerCommand) -> bool:
        return True

    def respawn(self, index: int) -> None:
        pass

    def send_wire(self, epoch: int, message: cluster_pb2.AgentMessage) -> bool:
        self.sent.append(message)
        return True


def test_register_reports_the_models_vocabulary_size():
    # Prepare: two workers of a 320-token model are ready
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        device="cpu",
        num_workers=2,
        model="tiny",
        roles=("general", "general"),
        kv_budget=None,
        node_id="n1",
        api_key=None,
        drain_timeout_s=5.0,
    )
    wire = _Wire()
    core = AgentCore(config, wire, "127.0.0.1:9", "test", [0, 1])
    for i in range(2):
        core.handle(WorkerSaid(i, 0, m.Ready(100, "cpu", (), 1000 + i, vocab_size=320)))

    # Execute
    core.handle(Connected(1))

    # Assert
    registers = [w.register for w in wire.sent if w.HasField("register")]
    assert [r.vocab_size for r in registers] == [320]
