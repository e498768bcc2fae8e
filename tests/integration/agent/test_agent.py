"""A live agent (2 CPU worker processes, `tiny`) driven by a scripted control plane on loopback.

The tests share one agent (process start-up dominates on CPU) and use distinct request ids.
Every generated output is compared with one in-process engine's greedy output.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveAgent, Reference, prompt

from protos.pecsched.v1 import cluster_pb2, common_pb2

pytestmark = pytest.mark.slow


def start(rid: str, tokens: list[int], instance: str, max_new: int, **extra: object) -> dict:
    """Keyword arguments of a StartPrefill command."""
    fields = {
        "request_id": rid,
        "prompt_token_ids": tokens,
        "instance_ids": [instance],
        "max_new_tokens": max_new,
        "decode_in_place": True,
        **extra,
    }
    return {"start_prefill": cluster_pb2.StartPrefill(**fields)}


def run_probe(live: LiveAgent, rid: str, instance: str) -> None:
    """A sequence point on `instance`: a short request run to its end there. Its worker went
    through several iterations before the end was reported, and whatever a held or paused
    request did in them was reported before it (one ordered stream)."""
    live.cp.command(**start(rid, prompt(99, 8), instance, 4))
    end = live.cp.wait_end(rid)
    assert end.HasField("finished"), end


def kinds(live: LiveAgent, rid: str) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in live.cp.events(rid)]


def kv_used(live: LiveAgent, instance_id: str) -> int:
    beats = live.cp.heartbeats()
    loads = {load.instance_id: load for load in beats[-1].loads}
    return int(loads[instance_id].kv_used_tokens)


def wait_kv_free(live: LiveAgent, instance_id: str) -> None:
    live.cp.wait_for(
        lambda: live.cp.heartbeats() and kv_used(live, instance_id) == 0,
        30,
        f"KV of {instance_id} to be freed",
    )


def test_register_heartbeats_and_api_key(live: LiveAgent) -> None:
    # Assert
    reg = live.cp.registers[0]
    assert reg.node_id == "n1" and reg.model == "tiny"
    assert [i.instance_id for i in reg.instances] == ["n1/0", "n1/1"]
    assert [i.role for i in reg.instances] == [
        common_pb2.INSTANCE_ROLE_GENERAL,
        common_pb2.INSTANCE_ROLE_SHORT_DECODE,
    ]
    assert all(i.tp == 1 and i.kv_capacity_tokens == 4096 for i in reg.instances)
    host, port = reg.rendezvous_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert live.cp.metadata[0]["authorization"] == "Bearer secret"
    live.cp.wait_for(lambda: len(live.cp.heartbeats()) >= 3, 10, "three heartbeats")
    beat = live.cp.heartbeats()[-1]
    assert [load.instance_id for load in beat.loads] == ["n1/0", "n1/1"]
    seqs = [m.seq for m in live.cp.messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_commands_become_spans_under_the_control_planes_trace(live: LiveAgent) -> None:
    # Prepare
    trace_id, parent_id = "ab" * 16, "cd" * 8
    trace = common_pb2.TraceContext(traceparent=f"00-{trace_id}-{parent_id}-01")
    # Execute
    live.cp.command(trace=trace, **start("traced", [5, 6, 7], "n1/0", 2))
    live.cp.wait_end("traced")

    # Assert
    def exported(name: str) -> list[Any]:
        return [s for s in live.otlp.spans if s.trace_id.hex() == trace_id and s.name == name]

    live.cp.wait_for(lambda: exported("worker.decode"), 15, "the exported decode span")
    (span,) = exported("agent.start_prefill")
    assert span.parent_span_id.hex() == parent_id
    attrs = {a.key: a.value.string_value for a in span.attributes}
    assert attrs["pecsched.request.id"] == "traced" and attrs["pecsched.node.id"] == "n1"
    (prefill,) = exported("worker.prefill")
    (decode,) = exported("worker.decode")
    chunks = exported("worker.prefill_chunk")
    assert prefill.parent_span_id == span.span_id and decode.parent_span_id == span.span_id
    assert chunks and all(c.parent_span_id == prefill.span_id for c in chunks)
    assert all(c.end_time_unix_nano > c.start_time_unix_nano for c in chunks)


def test_chunked_prefill_and_decode_in_place_equal_the_engine_and_transformers(
    live: LiveAgent, reference: Reference, tmp_path: Path
) -> None:
    # Prepare
    tokens = prompt(1, 50)
    expected = reference.greedy(tokens, 12)
    assert expected == reference.transformers_greedy(tmp_path, tokens, 12)
    # Execute
    live.cp.command(**start("inplace", tokens, "n1/0", 12, chunk_tokens=16))
    end = live.cp.wait_end("inplace")
    # Assert
    assert end.WhichOneof("kind") == "finished", end
    assert end.finished.output_tokens == 12 and end.finished.reason == "length"
    chunks = [
        e.chunk_done for e in live.cp.events("inplace") if e.WhichOneof("kind") == "chunk_done"
    ]
    assert [c.chunk_index for c in chunks] == [0, 1, 2, 3]
    assert [c.tokens_done for c in chunks] == [16, 32, 48, 50]
    assert all(c.chunks_total == 4 for c in chunks)
    done = live.cp.wait_event("inplace", "prefill_done")
    assert done.prefill_done.prompt_tokens == 50 and done.instance_id == "n1/0"
    assert done.prefill_done.first_token_id == expected[0]
    assert live.cp.output("inplace") == expected
    assert len(set(expected)) >= 4, f"degenerate reference {expected}"


def test_prefill_transfer_then_decode_on_short_decode_instance(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare
    tokens = prompt(2, 40)
    expected = reference.greedy(tokens, 10)
    live.cp.command(**start("disagg", tokens, "n1/0", 10, decode_in_place=False))
    live.cp.wait_event("disagg", "prefill_done")
    run_probe(live, "disagg-probe-1", "n1/0")
    assert live.cp.output("disagg") == expected[:1], "held requests must not decode"
    # Execute
    live.cp.command(
        transfer_kv=cluster_pb2.TransferKv(
            request_id="disagg",
            transfer_id="t-disagg",
            source_instance_id="n1/0",
            destination_instance_id="n1/1",
            timeout_s=20,
        )
    )
    transfers = live.cp.wait_for(
        lambda: [
            e.kv_transfer
            for e in live.cp.events("disagg")
            if e.WhichOneof("kind") == "kv_transfer"
            and e.kv_transfer.state == common_pb2.TRANSFER_STATE_DONE
        ],
        30,
        "transfer DONE",
    )
    run_probe(live, "disagg-probe-2", "n1/1")
    assert live.cp.output("disagg") == expected[:1], "no decode before StartDecode"
    live.cp.command(
        start_decode=cluster_pb2.StartDecode(request_id="disagg", transfer_id="t-disagg")
    )
    end = live.cp.wait_end("disagg")
    # Assert
    assert end.WhichOneof("kind") == "finished" and end.instance_id == "n1/1", end
    assert live.cp.output("disagg") == expected
    assert transfers[0].destination_instance_id == "n1/1" and transfers[0].bytes > 0
    states = [
        e.kv_transfer.state
        for e in live.cp.events("disagg")
        if e.WhichOneof("kind") == "kv_transfer"
    ]
    assert states == [common_pb2.TRANSFER_STATE_TRANSFERRING, common_pb2.TRANSFER_STATE_DONE]
    wait_kv_free(live, "n1/0")
    wait_kv_free(live, "n1/1")


def test_pause_keeps_kv_and_resume_continues_without_recompute(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare: a long prompt in small chunks, paused right after admission
    tokens = prompt(3, 600)
    expected = reference.greedy(tokens, 6)
    short = prompt(4, 20)
    short_expected = reference.greedy(short, 5)
    # Execute
    live.cp.command(**start("long", tokens, "n1/0", 6, chunk_tokens=8))
    live.cp.command(pause=cluster_pb2.Pause(request_id="long"))
    paused = live.cp.wait_event("long", "paused").paused
    live.cp.command(**start("short-during-pause", short, "n1/0", 5))
    live.cp.wait_end("short-during-pause")
    chunks_before = kinds(live, "long").count("chunk_done")
    # Heartbeats lag the short's end: wait for one without its KV. The paused long's KV (all
    # 600 prompt tokens + 5 reserved for output) must be what stays resident.
    resident = 600 + 6 - 1
    live.cp.wait_for(
        lambda: kv_used(live, "n1/0") == resident, 10, f"exactly {resident} resident KV tokens"
    )
    live.cp.command(resume=cluster_pb2.Resume(request_id="long"))
    end = live.cp.wait_end("long", 90)
    # Assert
    assert chunks_before == paused.chunks_done, "no chunk may run while paused"
    chunks = [e.chunk_done for e in live.cp.events("long") if e.WhichOneof("kind") == "chunk_done"]
    assert [c.chunk_index for c in chunks] == list(range(75)), "resume continues, no recompute"
    assert end.WhichOneof("kind") == "finished"
    assert live.cp.output("long") == expected
    assert live.cp.output("short-during-pause") == short_expected


def test_colocated_short_prefill_runs_inside_long_decode_iterations(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare
    long_tokens, short_tokens = prompt(5, 30), prompt(6, 30)
    long_expected = reference.greedy(long_tokens, 40)
    short_expected = reference.greedy(short_tokens, 5)
    live.cp.command(**start("host", long_tokens, "n1/0", 40))
    live.cp.wait_for(lambda: len(live.cp.output("host")) >= 3, 30, "the long decode to run")
    # Execute
    colocate = cluster_pb2.Colocate(
        prefill=cluster_pb2.StartPrefill(
            request_id="colo",
            prompt_token_ids=short_tokens,
            instance_ids=["n1/0"],
            chunk_tokens=512,
            max_new_tokens=5,
            decode_in_place=True,
        ),
        iteration_prefill_budget_tokens=8,
    )
    live.cp.command(colocate=colocate)
    live.cp.wait_end("colo")
    live.cp.wait_end("host")
    # Assert
    chunks = [e.chunk_done for e in live.cp.events("colo") if e.WhichOneof("kind") == "chunk_done"]
    assert [c.tokens_done for c in chunks] == [8, 16, 24, 30]
    assert live.cp.output("colo") == short_expected
    assert live.cp.output("host") == long_expected
    # The long request kept decoding while the short prefill ran (same iterations).
    events = live.cp.events()
    first = next(i for i, e in enumerate(events) if e.request_id == "colo")
    last = max(
        i for i, e in enumerate(events) if e.request_id == "colo" and e.HasField("chunk_done")
    )
    between = [e for e in events[first:last] if e.request_id == "host" and e.HasField("tokens")]
    assert between, "the host's decode must continue during the colocated prefill"


@pytest.mark.parametrize("sp_kind", [common_pb2.SP_KIND_ULYSSES, common_pb2.SP_KIND_RING])
def test_sp_prefill_over_two_workers_pauses_resumes_and_decodes_on_the_group(
    live: LiveAgent, reference: Reference, sp_kind: int
) -> None:
    # Prepare
    rid = f"sp-{sp_kind}"
    tokens = prompt(12, 300)
    expected = reference.greedy(tokens, 8)
    # Execute: start on both workers, pause at once, resume after the pause is confirmed
    live.cp.command(
        **start(rid, tokens, "n1/0", 8, instance_ids=["n1/0", "n1/1"], chunk_tokens=64,
                sp_kind=sp_kind)
    )  # fmt: skip
    live.cp.command(pause=cluster_pb2.Pause(request_id=rid))
    paused = live.cp.wait_event(rid, "paused").paused
    run_probe(live, f"{rid}-probe", "n1/0")  # a short served while the long one is paused
    chunks_while_paused = kinds(live, rid).count("chunk_done")
    live.cp.command(resume=cluster_pb2.Resume(request_id=rid))
    end = live.cp.wait_end(rid, 60)
    # Assert
    assert end.WhichOneof("kind") == "finished", end
    assert chunks_while_paused == paused.chunks_done
    chunks = [e.chunk_done for e in live.cp.events(rid) if e.HasField("chunk_done")]
    assert [c.chunk_index for c in chunks] == [0, 1, 2, 3, 4]
    assert [c.tokens_done for c in chunks] == [64, 128, 192, 256, 300]
    assert all(e.instance_id == "n1/0" for e in live.cp.events(rid)), "rank 0 reports"
    assert live.cp.output(rid) == expected
    wait_kv_free(live, "n1/0")
    wait_kv_free(live, "n1/1")


def test_a_cancel_frees_an_sp_group_whose_member_never_joins_and_its_workers_keep_serving(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare: an SP group of n1/0, n1/1 and an instance of another node that never joins
    # (its node refused the StartPrefill, say while draining); they meet at this agent's store.
    # The agent's group timeout is 20 s: n1/0 and n1/1 would wait that long for n9/0.
    rid, tokens = "sp-absent", prompt(14, 20)
    store = live.cp.registers[0].rendezvous_address
    live.cp.command(
        **start(rid, prompt(13, 300), "n1/0", 8, instance_ids=["n1/0", "n1/1", "n9/0"],
                chunk_tokens=64, rendezvous_address=store, group_id="sp/absent")
    )  # fmt: skip
    # Execute: a plain request on n1/0 runs while the group waits; then the control plane
    # cancels the group's request
    live.cp.command(**start("beside-join", tokens, "n1/0", 5))
    beside = live.cp.wait_end("beside-join", 8)
    live.cp.command(cancel=cluster_pb2.CancelRequestCommand(request_id=rid))
    end = live.cp.wait_end(rid, 8)
    # Assert: served during the join, cancelled well before the group timeout (both within
    # 16 s of the StartPrefill), nothing failed, both workers free and serving
    assert beside.HasField("finished") and live.cp.output("beside-join") == reference.greedy(
        tokens, 5
    )
    assert end.HasField("cancelled"), end
    assert kinds(live, rid) == ["cancelled"]
    live.cp.command(**start("after-absent", tokens, "n1/1", 5))
    assert live.cp.wait_end("after-absent").HasField("finished")
    wait_kv_free(live, "n1/0")
    wait_kv_free(live, "n1/1")


def test_cancel_frees_kv_and_is_idempotent(live: LiveAgent) -> None:
    # Prepare: a request held after prefill (KV resident, waiting for a transfer)
    live.cp.command(**start("to-cancel", prompt(7, 300), "n1/0", 50, decode_in_place=False))
    live.cp.wait_event("to-cancel", "prefill_done")
    live.cp.wait_for(lambda: kv_used(live, "n1/0") >= 349, 10, "KV to be reserved")
    # Execute
    live.cp.command(cancel=cluster_pb2.CancelRequestCommand(request_id="to-cancel"))
    live.cp.command(cancel=cluster_pb2.CancelRequestCommand(request_id="never-seen"))
    # Assert
    live.cp.wait_event("to-cancel", "cancelled")
    live.cp.wait_event("never-seen", "cancelled")
    wait_kv_free(live, "n1/0")
    assert kinds(live, "to-cancel").count("cancelled") == 1


def test_invalid_commands_fail_clearly_and_the_agent_keeps_serving(
    live: LiveAgent, reference: Reference
) -> None:
    # Execute
    live.cp.command(**start("elsewhere", [1, 2], "n9/0", 3))
    live.cp.command(**start("empty", [], "n1/0", 3))
    live.cp.command(
        **start("sp", [1, 2], "n1/0", 3, instance_ids=["n1/0", "n1/1"], decode_in_place=False)
    )
    live.cp.command(**start("sp-remote", [1, 2], "n1/0", 3, instance_ids=["n1/0", "n9/1"]))
    live.cp.command(**start("too-long", [1] * 20000, "n1/0", 3))
    live.cp.command(pause=cluster_pb2.Pause(request_id="ghost"))
    live.cp.command(start_decode=cluster_pb2.StartDecode(request_id="ghost2"))
    live.cp.command()  # a Command with no kind
    tokens = prompt(8, 12)
    live.cp.command(**start("after-errors", tokens, "n1/0", 4))
    # Assert
    errors = {
        rid: live.cp.wait_event(rid, "failed").failed
        for rid in ("elsewhere", "empty", "sp", "sp-remote", "too-long", "ghost", "ghost2")
    }
    assert "instance_ids[0] 'n9/0'" in errors["elsewhere"].error
    assert "prompt_token_ids" in errors["empty"].error
    assert "decode_in_place" in errors["sp"].error
    assert "instance_ids[1] 'n9/1'" in errors["sp-remote"].error
    assert "exceeds the model limit" in errors["too-long"].error
    assert not errors["too-long"].retryable  # no instance of this model can run it
    assert errors["ghost"].retryable and "not resident" in errors["ghost"].error
    assert not errors["empty"].retryable
    assert live.cp.wait_event("", "failed").failed.error.startswith("command")
    assert live.cp.wait_end("after-errors").HasField("finished")
    assert live.cp.output("after-errors") == reference.greedy(tokens, 4)


def test_requeued_request_continues_after_its_generated_tokens(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare
    tokens = prompt(9, 25)
    expected = reference.greedy(tokens, 9)
    # Execute
    live.cp.command(**start("requeued", tokens, "n1/0", 9, generated_token_ids=expected[:4]))
    end = live.cp.wait_end("requeued")
    # Assert
    assert end.finished.output_tokens == 9
    got = [e.tokens for e in live.cp.events("requeued") if e.HasField("tokens")]
    assert got[0].start_index == 4
    assert [t for chunk in got for t in chunk.token_ids] == expected[4:]


def test_killed_worker_fails_its_requests_and_the_others_keep_serving(
    live: LiveAgent, reference: Reference
) -> None:
    # Prepare: a long decode on n1/1, whose worker we kill
    live.cp.command(**start("victim", prompt(10, 20), "n1/1", 3000))
    live.cp.wait_for(lambda: len(live.cp.output("victim")) >= 2, 30, "the victim to decode")
    pid = _worker_pid(live, 1)
    # Execute
    os.kill(pid, signal.SIGKILL)
    failed = live.cp.wait_event("victim", "failed", 30).failed
    tokens = prompt(11, 15)
    live.cp.command(**start("survivor", tokens, "n1/0", 5))
    # Assert
    assert failed.retryable and "died" in failed.error
    assert live.cp.wait_end("survivor").HasField("finished")
    assert live.cp.output("survivor") == reference.greedy(tokens, 5)
    # The slot is respawned and serves again.
    live.cp.command(**start("after-respawn", tokens, "n1/1", 5))
    assert live.cp.wait_end("after-respawn", 120).HasField("finished")
    assert live.cp.output("after-respawn") == reference.greedy(tokens, 5)


def _worker_pid(live: LiveAgent, index: int) -> int:
    """The pid of worker `index` of the in-process agent (a child of this process)."""
    import multiprocessing

    name = f"pecsched-worker-{index}"
    procs = [p for p in multiprocessing.active_children() if p.name == name]
    assert len(procs) == 1, [p.name for p in multiprocessing.active_children()]
    return int(procs[0].pid)
