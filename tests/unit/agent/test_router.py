"""CommandRouter as a pure function of (table, input, now): the Step it returns and the table
it leaves, with no agent, ports or clock around it."""

from __future__ import annotations

import copy

from dataplane.agent.commands import CommandRouter
from dataplane.agent.routes import RequestTable, Route
from dataplane.agent.steps import Node, Step
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2

NODE = Node("n1", 2, "cpu", (0, 1), "127.0.0.1:9", 30.0)


def router(table: RequestTable | None = None) -> CommandRouter:
    r = CommandRouter(NODE, table)
    for index in range(NODE.num_workers):
        r.worker_ready(index, (0,))
    return r


def start(rid: str, instances: list[str], **extra: object) -> cluster_pb2.Command:
    fields: dict[str, object] = {
        "request_id": rid,
        "prompt_token_ids": [1, 2, 3],
        "instance_ids": instances,
        "max_new_tokens": 4,
        "decode_in_place": True,
        **extra,
    }
    return cluster_pb2.Command(start_prefill=cluster_pb2.StartPrefill(**fields))  # type: ignore[arg-type]


def cancel(rid: str) -> cluster_pb2.Command:
    return cluster_pb2.Command(cancel=cluster_pb2.CancelRequestCommand(request_id=rid))


def kinds(step: Step) -> list[str | None]:
    return [e.WhichOneof("kind") for e in step.events]


def test_same_table_command_and_time_give_the_same_step_and_table() -> None:
    # Prepare: two routers in one state
    table = RequestTable(routes={"r": Route({0}, 0, 3)})
    a, b = router(copy.deepcopy(table)), router(copy.deepcopy(table))
    # Execute
    steps = [r.on_command(cancel("r"), 42.5) for r in (a, b)]
    answers = [r.on_report(0, m.Cancelled("r"), 43.0) for r in (a, b)]
    # Assert
    assert steps[0] == steps[1] and answers[0] == answers[1] and a.table == b.table
    assert steps[0].to_workers == [(0, m.Cancel("r"))] and not steps[0].events
    assert [(kinds(answers[0]), answers[0].events[0].at_s)] == [(["cancelled"], 43.0)]
    assert a.table.idle


def test_start_prefill_routes_the_request_and_sends_nothing_to_the_wire() -> None:
    r = router()
    step = r.on_command(start("r", ["n1/1"], generated_token_ids=[9]), 1.0)
    ((index, cmd),) = step.to_workers
    assert index == 1 and isinstance(cmd, m.Prefill) and cmd.prompt_token_ids == (1, 2, 3, 9)
    assert not step.events and step.error is None and step.shutdown is None
    assert r.table.routes == {"r": Route({1}, 1, 3)}


def test_an_invalid_command_is_a_failed_event_at_now_and_leaves_the_table_alone() -> None:
    # Prepare
    r = router(RequestTable(routes={"r": Route({0}, 0, 3)}))
    before = copy.deepcopy(r.table)
    # Execute: a second placement of a resident request, a pause of an unknown one
    again = r.on_command(start("r", ["n1/1"]), 7.0)
    pause = r.on_command(cluster_pb2.Command(pause=cluster_pb2.Pause(request_id="x")), 8.0)
    # Assert
    assert again.error is not None and "already resident" in again.error and not again.to_workers
    (failed,) = again.events
    assert failed.at_s == 7.0 and not failed.failed.retryable
    assert pause.events[0].failed.retryable and pause.events[0].at_s == 8.0
    assert r.table == before


def test_shutdown_is_returned_to_the_agent_not_acted_on() -> None:
    r = router(RequestTable(routes={"r": Route({0}, 0, 3)}))
    step = r.on_command(cluster_pb2.Command(shutdown=cluster_pb2.Shutdown(drain=True)), 1.0)
    assert step.shutdown is not None and step.shutdown.drain
    assert not (step.to_workers or step.events) and not r.draining and "r" in r.table.routes


def test_a_worker_death_fails_its_requests_and_answers_its_pending_cancels() -> None:
    # Prepare: "sp" on both workers, "solo" on worker 0, a Cancel of "gone" awaiting worker 0
    r = router(
        RequestTable(
            routes={"sp": Route({0, 1}, 0, 3), "solo": Route({0}, 0, 3), "other": Route({1}, 0, 3)},
            cancelling={"gone": {0}},
        )
    )
    # Execute
    step = r.worker_died(0, -9, 5.0)
    # Assert
    assert step.to_workers == [(1, m.Cancel("sp", silent=True))]
    assert [(e.request_id, e.WhichOneof("kind")) for e in step.events] == [
        ("solo", "failed"),
        ("sp", "failed"),
        ("gone", "cancelled"),
    ]
    assert all(e.at_s == 5.0 for e in step.events) and step.events[0].failed.retryable
    assert list(r.table.routes) == ["other"] and not r.table.cancelling


def test_drain_hands_back_paused_requests_and_refuses_new_ones() -> None:
    # Prepare
    r = router(RequestTable(routes={"p": Route({0}, 0, 3, paused=True), "run": Route({1}, 0, 3)}))
    # Execute
    drained = r.start_drain(3.0)
    refused = r.on_command(start("new", ["n1/0"]), 4.0)
    # Assert
    assert drained.to_workers == [(0, m.Cancel("p", silent=True))]
    assert [(e.request_id, e.instance_id, e.failed.retryable) for e in drained.events] == [
        ("p", "n1/0", True)
    ]
    assert refused.events[0].failed.retryable and "draining" in refused.events[0].failed.error
    assert list(r.table.routes) == ["run"]


def test_reports_of_requests_without_a_route_are_dropped() -> None:
    r = router()
    for report in (m.Tokens("x", 0, (1,)), m.Finished("x", 1, "eos"), m.Cancelled("x")):
        assert r.on_report(0, report, 1.0) == Step()
