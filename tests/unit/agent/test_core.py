"""AgentCore without processes: routing, event de-duplication, buffering across reconnects,
registration, heartbeats, drain and worker death. Ports record what the core sends."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry import trace

from dataplane.agent.config import AgentConfig
from dataplane.agent.core import AgentCore
from dataplane.agent.link import Connected, ControlIn, Disconnected
from dataplane.agent.supervisor import WorkerDied, WorkerSaid
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2


@dataclass
class RecordingPorts:
    """Records worker commands, respawns and wire messages; every send succeeds."""

    worker: list[tuple[int, m.WorkerCommand]] = field(default_factory=list)
    respawned: list[int] = field(default_factory=list)
    wire: list[cluster_pb2.AgentMessage] = field(default_factory=list)

    def send_worker(self, index: int, cmd: m.WorkerCommand) -> bool:
        self.worker.append((index, cmd))
        return True

    def respawn(self, index: int) -> None:
        self.respawned.append(index)

    def send_wire(self, epoch: int, message: cluster_pb2.AgentMessage) -> bool:
        self.wire.append(message)
        return True

    def events(self) -> list[cluster_pb2.Event]:
        return [w.event for w in self.wire if w.HasField("event")]


def make_core(
    num_workers: int = 2,
    device: str = "cpu",
    device_indices: list[int] | None = None,
    tracer: trace.Tracer | None = None,
) -> tuple[AgentCore, RecordingPorts]:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        device=device,
        num_workers=num_workers,
        model="tiny",
        roles=("general",) * num_workers,
        kv_budget=None,
        node_id="n1",
        api_key=None,
        drain_timeout_s=5.0,
    )
    ports = RecordingPorts()
    indices = list(range(num_workers)) if device_indices is None else device_indices
    core = AgentCore(config, ports, "127.0.0.1:9", "test", indices, tracer)
    for i in range(num_workers):
        core.handle(WorkerSaid(i, 0, m.Ready(100, "cpu", (), 1000 + i)))
    return core, ports


def attach(core: AgentCore, epoch: int = 1, drop: tuple[str, ...] = ()) -> None:
    core.handle(Connected(epoch))
    registered = cluster_pb2.Registered(heartbeat_interval_s=0.5, drop_request_ids=drop)
    core.handle(ControlIn(epoch, cluster_pb2.ControlMessage(registered=registered)))


def command(core: AgentCore, epoch: int = 1, **kind: object) -> None:
    msg = cluster_pb2.ControlMessage(command=cluster_pb2.Command(**kind))  # type: ignore[arg-type]
    core.handle(ControlIn(epoch, msg))


def prefill(core: AgentCore, rid: str, instances: list[str], **extra: object) -> None:
    fields: dict[str, object] = {
        "request_id": rid,
        "prompt_token_ids": [1, 2, 3],
        "instance_ids": instances,
        "max_new_tokens": 4,
        "decode_in_place": True,
        **extra,
    }
    command(core, start_prefill=cluster_pb2.StartPrefill(**fields))  # type: ignore[arg-type]


def test_register_then_buffered_events_flow_after_registered() -> None:
    # Prepare
    core, ports = make_core()
    # Execute: an event before any stream, then attach
    core.handle(Connected(1))
    prefill(core, "r", ["n1/0"])
    core.handle(WorkerSaid(0, 0, m.Tokens("r", 0, (7,))))
    assert not ports.events(), "nothing is sent before Registered"
    attach(core, 1)
    # Assert
    assert ports.wire[0].HasField("register")
    assert [i.instance_id for i in ports.wire[0].register.instances] == ["n1/0", "n1/1"]
    assert ports.wire[0].register.rendezvous_address == "127.0.0.1:9"
    assert [e.tokens.token_ids[0] for e in ports.events()] == [7]
    assert [w.seq for w in ports.wire] == sorted({w.seq for w in ports.wire})


def test_reconnect_registers_resident_requests_and_drops_what_the_cp_lists() -> None:
    # Prepare
    core, ports = make_core()
    attach(core, 1)
    prefill(core, "keep", ["n1/0"])
    prefill(core, "drop", ["n1/1"])
    # Execute
    core.handle(Disconnected(1, "gone"))
    core.handle(WorkerSaid(0, 0, m.Tokens("keep", 0, (5,))))
    attach(core, 2, drop=("drop",))
    # Assert
    registers = [w.register for w in ports.wire if w.HasField("register")]
    assert list(registers[1].resident_request_ids) == ["drop", "keep"]
    assert (1, m.Cancel("drop", silent=True)) in ports.worker
    assert "drop" not in core.table.routes
    assert [e.request_id for e in ports.events()] == ["keep"], "buffered event re-sent"


def test_offsets_after_requeue_and_prompt_length() -> None:
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/0"], generated_token_ids=[9, 9])
    sent = ports.worker[-1][1]
    assert isinstance(sent, m.Prefill)
    assert sent.prompt_token_ids == (1, 2, 3, 9, 9) and sent.sampling.max_new_tokens == 2
    core.handle(WorkerSaid(0, 0, m.PrefillDone("r", 5, 4)))
    core.handle(WorkerSaid(0, 0, m.Tokens("r", 0, (4,))))
    core.handle(WorkerSaid(0, 0, m.Finished("r", 2, "length")))
    done, tokens, finished = ports.events()
    assert done.prefill_done.prompt_tokens == 3
    assert tokens.tokens.start_index == 2
    assert finished.finished.output_tokens == 4


def test_a_mixed_colocate_hands_its_batch_budget_to_the_worker_and_chunks_report_it() -> None:
    core, ports = make_core()
    attach(core)
    start = cluster_pb2.StartPrefill(
        request_id="r", prompt_token_ids=[1] * 40, instance_ids=["n1/1"], max_new_tokens=4,
        decode_in_place=True, chunk_tokens=32,
    )  # fmt: skip
    budget = {"iteration_prefill_budget_tokens": 16, "mixed_batch_tokens": 24}
    command(core, colocate=cluster_pb2.Colocate(prefill=start, **budget))  # type: ignore[arg-type]
    index, sent = ports.worker[-1]
    core.handle(WorkerSaid(1, 0, m.PrefillChunkDone("r", 0, 3, 16, 0.1, 7, 21, 16)))
    (event,) = ports.events()
    assert index == 1 and isinstance(sent, m.Prefill)
    assert (sent.chunk_tokens, sent.batch_tokens) == (16, 24)
    c = event.chunk_done
    assert (c.iteration, c.iteration_tokens, c.chunk_tokens, c.tokens_done) == (7, 21, 16, 16)


def test_cancel_answers_once_after_every_holder_replied() -> None:
    core, ports = make_core()
    attach(core)
    prefill(core, "sp", ["n1/0", "n1/1"])
    command(core, cancel=cluster_pb2.CancelRequestCommand(request_id="sp"))
    assert {i for i, c in ports.worker if c == m.Cancel("sp")} == {0, 1}
    core.handle(WorkerSaid(0, 0, m.Cancelled("sp")))
    assert not ports.events()
    core.handle(WorkerSaid(1, 0, m.Cancelled("sp")))
    core.handle(WorkerSaid(1, 0, m.Cancelled("sp")))
    assert [e.WhichOneof("kind") for e in ports.events()] == ["cancelled"]


def test_transfer_events_transferring_from_source_done_from_destination_failed_once() -> None:
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/0"], decode_in_place=False)
    transfer = cluster_pb2.TransferKv(
        request_id="r", transfer_id="t", source_instance_id="n1/0", destination_instance_id="n1/1"
    )
    command(core, transfer_kv=transfer)
    sends = [c for _, c in ports.worker if isinstance(c, m.SendKv | m.RecvKv)]
    assert [type(c).__name__ for c in sends] == ["SendKv", "RecvKv"]
    assert sends[0].group_id == "kv/t" and sends[0].store_address == "127.0.0.1:9"
    core.handle(WorkerSaid(0, 0, m.KvTransferUpdate("r", "t", "transferring", True, 0, 0.0, "")))
    core.handle(WorkerSaid(0, 0, m.KvTransferUpdate("r", "t", "done", True, 10, 0.1, "")))
    core.handle(WorkerSaid(1, 0, m.KvTransferUpdate("r", "t", "done", False, 10, 0.1, "")))
    states = [e.kv_transfer.state for e in ports.events()]
    assert states == [2, 3]  # TRANSFERRING, DONE
    assert all(e.instance_id == "n1/0" for e in ports.events())
    assert core.table.routes["r"].workers == {1}
    command(core, start_decode=cluster_pb2.StartDecode(request_id="r", transfer_id="t"))
    assert ports.worker[-1] == (1, m.StartDecode("r"))


def test_request_placed_again_right_after_a_cancel_runs_and_old_reports_are_dropped() -> None:
    """A re-queue cancels the request here and places it here again in one tick (seen when
    the node of a KV transfer's source died): the new placement must run, not be refused."""
    # Prepare: n1/1 receives the request's KV from a node that then dies
    core, ports = make_core()
    attach(core)
    transfer = cluster_pb2.TransferKv(
        request_id="r", transfer_id="t", source_instance_id="n0/0", destination_instance_id="n1/1"
    )
    command(core, transfer_kv=transfer)
    # Execute: the control plane's re-queue, then the receiver's answers, oldest first
    command(core, cancel=cluster_pb2.CancelRequestCommand(request_id="r"))
    prefill(core, "r", ["n1/0"])
    core.handle(WorkerSaid(1, 0, m.KvTransferUpdate("r", "t", "failed", False, 0, 0.1, "gone")))
    core.handle(WorkerSaid(1, 0, m.Cancelled("r")))
    core.handle(WorkerSaid(0, 0, m.PrefillDone("r", 3, 7)))
    # Assert
    assert ports.worker[-1][0] == 0 and isinstance(ports.worker[-1][1], m.Prefill)
    events = ports.events()
    assert [e.WhichOneof("kind") for e in events] == ["cancelled", "prefill_done"], events
    assert core.table.routes["r"].workers == {0} and not core.table.cancelling


def test_failed_receive_leaves_no_route_behind() -> None:
    # Prepare
    core, ports = make_core()
    attach(core)
    transfer = cluster_pb2.TransferKv(
        request_id="r", transfer_id="t", source_instance_id="n0/0", destination_instance_id="n1/1"
    )
    command(core, transfer_kv=transfer)
    # Execute: the receive fails; later the request is prefilled here from scratch
    core.handle(WorkerSaid(1, 0, m.KvTransferUpdate("r", "t", "failed", False, 0, 0.1, "gone")))
    prefill(core, "r", ["n1/1"])
    # Assert
    assert [e.WhichOneof("kind") for e in ports.events()] == ["kv_transfer"]
    assert isinstance(ports.worker[-1][1], m.Prefill) and core.table.routes["r"].workers == {1}


def test_worker_death_answers_its_pending_cancel() -> None:
    # Prepare
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/0"])
    command(core, cancel=cluster_pb2.CancelRequestCommand(request_id="r"))
    # Execute
    core.handle(WorkerDied(0, 0, -9))
    # Assert
    assert [e.WhichOneof("kind") for e in ports.events()] == ["cancelled"]
    assert not core.table.cancelling


def test_worker_death_fails_its_requests_and_respawns() -> None:
    core, ports = make_core()
    attach(core)
    prefill(core, "a", ["n1/0"])
    prefill(core, "b", ["n1/1"])
    core.handle(WorkerDied(1, 0, -9))
    core.handle(WorkerSaid(1, 0, m.Tokens("b", 0, (1,))))  # a late report of the dead process
    (failed,) = ports.events()
    assert failed.request_id == "b" and failed.failed.retryable and "died" in failed.failed.error
    assert ports.respawned == [1] and "a" in core.table.routes


def test_drain_hands_back_paused_work_refuses_new_and_finishes() -> None:
    core, ports = make_core()
    attach(core)
    prefill(core, "paused", ["n1/0"])
    core.handle(WorkerSaid(0, 0, m.Paused("paused", 1)))
    prefill(core, "running", ["n1/1"])
    core.start_drain(100.0)
    prefill(core, "new", ["n1/0"])
    core.tick(101.0)
    assert not core.finished
    core.handle(WorkerSaid(1, 0, m.Finished("running", 4, "length")))
    core.tick(102.0)
    assert core.finished
    failed = {e.request_id: e.failed for e in ports.events() if e.HasField("failed")}
    assert failed["paused"].retryable and "draining" in failed["paused"].error
    assert failed["new"].retryable and "draining" in failed["new"].error


def test_heartbeat_reports_busy_time_since_the_previous_one() -> None:
    core, ports = make_core()
    attach(core)
    core.handle(WorkerSaid(0, 0, m.Load(30, 1, 2.0, ("x",))))
    core.tick(10.0)
    core.handle(WorkerSaid(0, 0, m.Load(30, 1, 2.5, ("x",))))
    core.tick(10.1)  # before the interval: no heartbeat
    core.tick(10.6)
    beats = [w.heartbeat for w in ports.wire if w.HasField("heartbeat")]
    assert len(beats) == 2
    assert [b.loads[0].busy_s for b in beats] == [2.0, 0.5]
    assert beats[0].loads[0].kv_used_tokens == 30 and beats[0].loads[1].kv_used_tokens == 0


def test_invalid_commands_become_failed_events() -> None:
    core, ports = make_core()
    attach(core)
    command(core)  # no kind
    prefill(core, "", ["n1/0"])
    command(core, pause=cluster_pb2.Pause(request_id="nobody"))
    command(
        core,
        colocate=cluster_pb2.Colocate(
            prefill=cluster_pb2.StartPrefill(request_id="c", prompt_token_ids=[1]),
            iteration_prefill_budget_tokens=0,
        ),
    )
    errors = [(e.request_id, e.failed.error, e.failed.retryable) for e in ports.events()]
    assert errors[0][1].startswith("command: command has no known kind")
    assert "request_id must not be empty" in errors[1][1]
    assert errors[2][0] == "nobody" and errors[2][2] is True
    assert errors[3][0] == "c" and "iteration_prefill_budget_tokens" in errors[3][1]


def test_transfers_between_workers_of_this_node_are_marked_same_node() -> None:
    # Prepare: r is resident on n1/0
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/0"], decode_in_place=False)
    # Execute: one transfer inside the node, one to another node
    for tid, dst in (("t1", "n1/1"), ("t2", "n2/0")):
        kv = cluster_pb2.TransferKv(
            request_id="r", transfer_id=tid, source_instance_id="n1/0", destination_instance_id=dst
        )
        command(core, transfer_kv=kv)
    # Assert: the worker picks CUDA IPC for the first (on GPUs), its pair group for the second
    sends = [c for _, c in ports.worker if isinstance(c, m.SendKv)]
    (recv,) = [c for _, c in ports.worker if isinstance(c, m.RecvKv)]
    assert [(c.transfer_id, c.same_node) for c in sends] == [("t1", True), ("t2", False)]
    assert recv.same_node


def test_an_sp_group_of_workers_sharing_a_gpu_is_refused_not_left_to_hang() -> None:
    # Prepare: three CUDA workers, two of them on GPU 0
    core, ports = make_core(3, "cuda", [0, 0, 1])
    attach(core)
    # Execute
    prefill(core, "shared", ["n1/0", "n1/1"])
    prefill(core, "distinct", ["n1/1", "n1/2"])
    # Assert: the first fails at once naming the GPU; the second starts on both workers
    (failed,) = [e for e in ports.events() if e.request_id == "shared"]
    assert not failed.failed.retryable and "shares GPU(s) cuda:0" in failed.failed.error
    started = [(i, c.request_id) for i, c in ports.worker if isinstance(c, m.SpPrefill)]
    assert started == [(1, "distinct"), (2, "distinct")]


def test_an_sp_group_spanning_nodes_meets_at_the_named_store_and_rank_0s_node_reports() -> None:
    # Prepare: rank 0 is n2/0 on another node; this node holds ranks 1 and 2
    core, ports = make_core()
    attach(core)
    group = ["n2/0", "n1/0", "n1/1"]
    # Execute
    prefill(core, "r", group, rendezvous_address="10.0.0.2:29500", group_id="r/p1")
    prefill(core, "no-store", ["n2/0", "n1/0"], group_id="x/p1")
    prefill(core, "not-here", ["n2/0", "n3/0"], rendezvous_address="10.0.0.2:1", group_id="y")
    core.handle(WorkerSaid(0, 0, m.Paused("r", 2)))
    core.handle(WorkerSaid(1, 0, m.Paused("r", 2)))
    paused = core.table.routes["r"].paused
    for index in (1, 0):
        core.handle(WorkerSaid(index, 0, m.Finished("r", 4, "length")))
    # Assert: both members join group r/p1 at rank 0's store; this node reports nothing of
    # the progress (rank 0's node does) and forgets r once both members finished
    started = [(i, c) for i, c in ports.worker if isinstance(c, m.SpPrefill)]
    assert [i for i, _ in started] == [0, 1]
    assert {(c.group_id, c.store_address, c.member_ids) for _, c in started} == {
        ("r/p1", "10.0.0.2:29500", tuple(group))
    }
    assert paused and "r" not in core.table.routes
    errors = {e.request_id: e.failed.error for e in ports.events()}
    assert errors.keys() == {"no-store", "not-here"}, "nothing said about r"
    assert "instance_ids[0] 'n2/0'" in errors["no-store"]
    assert "needs rendezvous_address and group_id" in errors["no-store"]
    assert "no instance of instance_ids" in errors["not-here"]


def test_a_failure_of_a_member_whose_rank_0_is_elsewhere_is_reported_and_frees_the_others() -> None:
    # Prepare
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n2/0", "n1/0", "n1/1"], rendezvous_address="h:1", group_id="g")
    # Execute: the group broke (say rank 0's node died)
    core.handle(WorkerSaid(1, 0, m.Failed("r", "SP group failed: peer gone", True)))
    core.handle(WorkerSaid(0, 0, m.Failed("r", "SP group failed: peer gone", True)))
    # Assert: one retryable Failed from this node; the other member frees it silently
    (failed,) = ports.events()
    assert failed.instance_id == "n1/1" and failed.failed.retryable
    assert (0, m.Cancel("r", silent=True)) in ports.worker
    assert "r" not in core.table.routes


def test_only_rank_0_reports_an_sp_group_of_this_node_even_when_others_finish_first() -> None:
    # Prepare
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/1", "n1/0"])
    # Execute: rank 1 (worker 0) finishes before rank 0's last tokens reach the agent
    core.handle(WorkerSaid(0, 0, m.Finished("r", 2, "length")))
    core.handle(WorkerSaid(1, 0, m.Tokens("r", 0, (5, 6))))
    core.handle(WorkerSaid(1, 0, m.Finished("r", 2, "length")))
    # Assert
    kinds = [(e.instance_id, e.WhichOneof("kind")) for e in ports.events()]
    assert kinds == [("n1/1", "tokens"), ("n1/1", "finished")]
    assert not core.table.routes


def test_start_decode_runs_on_the_named_instance_and_a_refusal_names_it() -> None:
    # Prepare: r is held on n1/0 after its prefill
    core, ports = make_core()
    attach(core)
    prefill(core, "r", ["n1/0"], decode_in_place=False)
    # Execute
    for rid, instance_id in (("r", "n1/1"), ("ghost", "n1/1"), ("r", "n1/0")):
        decode = cluster_pb2.StartDecode(request_id=rid, instance_id=instance_id)
        command(core, start_decode=decode)
    # Assert: the two refusals name the instance (retryable: the request may decode
    # elsewhere); the third starts on worker 0
    refusals = [(e.request_id, e.instance_id, e.failed.retryable) for e in ports.events()]
    assert refusals == [("r", "n1/1", True), ("ghost", "n1/1", True)]
    assert [(i, c) for i, c in ports.worker if isinstance(c, m.StartDecode)] == [
        (0, m.StartDecode("r"))
    ]


def test_transfers_are_forgotten_with_their_requests_at_the_next_heartbeat() -> None:
    # Prepare: "done" moved to n1/1 and finished there; "failed" failed its transfer and was
    # cancelled; "live" is still being sent
    core, ports = make_core()
    attach(core)
    for rid in ("done", "failed", "live"):
        prefill(core, rid, ["n1/0"], decode_in_place=False)
        kv = cluster_pb2.TransferKv(
            request_id=rid,
            transfer_id=f"{rid}/t1",
            source_instance_id="n1/0",
            destination_instance_id="n1/1",
        )
        command(core, transfer_kv=kv)
    for index, is_source in ((0, True), (1, False)):
        core.handle(
            WorkerSaid(
                index, 0, m.KvTransferUpdate("done", "done/t1", "done", is_source, 1, 0.1, "")
            )
        )
    core.handle(WorkerSaid(1, 0, m.Finished("done", 2, "length")))
    core.handle(
        WorkerSaid(1, 0, m.KvTransferUpdate("failed", "failed/t1", "failed", False, 0, 0.1, "x"))
    )
    command(core, cancel=cluster_pb2.CancelRequestCommand(request_id="failed"))
    assert core.table.failed_transfers == {"failed/t1"}
    # Execute
    core.tick(1e9)
    # Assert: only the live request's transfer is kept
    assert set(core.table.transfers) == {"live/t1"} and not core.table.failed_transfers
    assert ports.wire[-1].HasField("heartbeat")
