"""WorkerRuntime around real tiny engines, KV transfers over an in-process gloo pair: what a
source worker does with its outgoing transfer when the control plane gives up on it, and what
a Pause that arrives after the prefill ended does (alone and in an SP group), and what a
worker does while it joins an SP group whose other member never comes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import torch
from waiting import wait_until

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.types import SamplingParams
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config
from dataplane.parallel.groups import GroupManager, connect_store, make_backend_factory
from dataplane.worker import messages as m
from dataplane.worker.runtime import WorkerRuntime

PROMPT = tuple((i * 37 + 11) % 256 for i in range(90))
SAMPLING = SamplingParams(max_new_tokens=8)
TIMEOUT_S = 20.0
R = TypeVar("R")


@dataclass
class Worker:
    """One runtime and everything it reported so far."""

    runtime: WorkerRuntime
    manager: GroupManager
    reports: list[m.WorkerReport] = field(default_factory=list)

    def step(self) -> None:
        self.runtime.run_once()
        self.reports.extend(self.runtime.take_reports())

    def handle(self, cmd: m.WorkerCommand) -> None:
        self.runtime.handle(cmd)
        self.reports.extend(self.runtime.take_reports())

    def of(self, kind: type[R]) -> list[R]:
        return [r for r in self.reports if isinstance(r, kind)]


def _only(manager: GroupManager) -> Callable[[str], GroupManager]:
    """The worker's manager lookup by store address: one store here."""
    return lambda _address: manager


@pytest.fixture
def pair() -> Iterator[tuple[Worker, Worker, str]]:
    """Workers w0 and w1 (same seeded tiny weights), rendezvousing through one TCPStore."""
    model = random_model(
        preset_config("tiny"), seed=0, dtype=torch.float32, device=torch.device("cpu")
    )
    master = connect_store("127.0.0.1", 0, TIMEOUT_S, is_master=True)
    address = f"127.0.0.1:{master.port}"
    factory = make_backend_factory("cpu", "127.0.0.1")
    workers = []
    for name in ("w0", "w1"):
        store = connect_store("127.0.0.1", master.port, TIMEOUT_S)
        manager = GroupManager(store, name, factory, TIMEOUT_S)
        engine = Engine(model, EngineConfig(chunk_tokens=64, kv_budget_bytes=4 << 20))
        workers.append(Worker(WorkerRuntime(engine, name, _only(manager)), manager))
    yield workers[0], workers[1], address
    for worker in workers:
        worker.manager.close()


def run_until(workers: list[Worker], done: Callable[[], object], limit_s: float = 60.0) -> None:
    """Step `workers` until `done()`; fails after `limit_s`."""

    def stepped() -> object:
        if done():
            return True
        for worker in workers:
            worker.step()
        return False

    wait_until(stepped, "progress", limit_s, poll_s=0.001)


def test_decode_in_place_aborts_the_send_whose_destination_was_lost(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: w0 prefills and streams the KV to w1, which receives all of it and then (say)
    # dies before its DONE reaches the control plane; w0 has not polled its sender yet.
    src, dst, address = pair
    src.handle(m.Prefill("r", PROMPT, SAMPLING, 64, decode_in_place=False))
    run_until([src], lambda: src.of(m.PrefillDone))
    src.handle(m.SendKv("r", "t1", "g1", "w1", address, TIMEOUT_S))
    dst.handle(m.RecvKv("r", "t1", "g1", "w0", address, TIMEOUT_S))
    run_until([dst], lambda: dst.of(m.KvTransferUpdate))
    assert [u.state for u in dst.of(m.KvTransferUpdate)] == ["done"]
    # Execute: the control plane decodes where it prefilled
    src.handle(m.StartDecode("r"))
    run_until([src], lambda: not src.runtime.has_work())
    # Assert: the request decoded to the end on w0, equal to the copy on w1; no late DONE
    # of the abandoned send freed it
    dst.handle(m.StartDecode("r"))
    run_until([dst], lambda: dst.of(m.Finished))
    (finished,) = src.of(m.Finished)
    assert finished.output_tokens == SAMPLING.max_new_tokens
    tokens = [t for r in src.of(m.Tokens) for t in r.token_ids]
    expected = [t for r in dst.of(m.Tokens) for t in r.token_ids]
    assert tokens[1:] == expected and len(tokens) == SAMPLING.max_new_tokens
    states = [u.state for u in src.of(m.KvTransferUpdate)]
    assert "done" not in states, states


def test_transfers_of_a_pair_run_in_order_over_one_persistent_group(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: three prefilled requests on w0, their transfers to w1 ordered back to back (the
    # live GPU cluster's pattern: shorts finish prefill faster than one transfer takes)
    src, dst, address = pair
    rids = ("a", "b", "c")
    for rid in rids:
        src.handle(m.Prefill(rid, PROMPT, SAMPLING, 64, decode_in_place=False))
    run_until([src], lambda: len(src.of(m.PrefillDone)) == len(rids))
    # Execute
    for i, rid in enumerate(rids):
        src.handle(m.SendKv(rid, f"t{i}", f"g{i}", "w1", address, TIMEOUT_S))
        dst.handle(m.RecvKv(rid, f"t{i}", f"g{i}", "w0", address, TIMEOUT_S))
    run_until([src, dst], lambda: len(dst.of(m.KvTransferUpdate)) == len(rids))
    for rid in rids:
        dst.handle(m.StartDecode(rid))
    run_until([src, dst], lambda: len(dst.of(m.Finished)) == len(rids))
    # Assert: every transfer landed, one at a time over the group the first one created, which
    # stays up for the next transfer (no communicator per transfer)
    assert [(u.request_id, u.state) for u in dst.of(m.KvTransferUpdate)] == [
        (rid, "done") for rid in rids
    ]
    assert src.manager.group_ids() == dst.manager.group_ids() == ("g0",)
    assert {f.request_id: f.output_tokens for f in dst.of(m.Finished)} == dict.fromkeys(
        rids, SAMPLING.max_new_tokens
    )


def test_a_superseded_receive_never_fails_the_request_its_successor_delivered(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: w1 was told to receive r as t1, but the control plane gave up on t1 (its sender
    # never started it) and retried as t2. Before the fix, t1's late failure was reported
    # against r after t2 had delivered it, and the agent dropped r's route: r never finished.
    src, dst, address = pair
    src.handle(m.Prefill("r", PROMPT, SAMPLING, 64, decode_in_place=False))
    run_until([src], lambda: src.of(m.PrefillDone))
    stale_timeout_s = 2.0
    dst.handle(m.RecvKv("r", "t1", "g1", "w0", address, stale_timeout_s))
    # Execute
    src.handle(m.SendKv("r", "t2", "g2", "w1", address, TIMEOUT_S))
    dst.handle(m.RecvKv("r", "t2", "g2", "w0", address, TIMEOUT_S))
    run_until([src, dst], lambda: dst.of(m.KvTransferUpdate))
    dst.handle(m.StartDecode("r"))
    run_until([dst], lambda: dst.of(m.Finished))
    # every transfer retired: a t1 still live would end (and be reported) by its deadline first
    run_until([dst], lambda: not dst.runtime.has_work())
    # Assert: r decoded to the end on w1 and nothing was ever said about t1
    assert [(u.transfer_id, u.state) for u in dst.of(m.KvTransferUpdate)] == [("t2", "done")]
    assert [f.output_tokens for f in dst.of(m.Finished)] == [SAMPLING.max_new_tokens]
    assert not dst.of(m.Failed)


def test_a_pause_that_crosses_the_end_of_a_prefill_is_dropped(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: the control plane pauses r while its last chunk runs; the Pause lands after
    # PrefillDone, which moved r to decoding on the control plane (no Resume will come)
    worker = pair[0]
    worker.handle(m.Prefill("r", PROMPT, SAMPLING, 64, decode_in_place=True))
    run_until([worker], lambda: worker.of(m.PrefillDone))
    # Execute
    worker.handle(m.Pause("r"))
    run_until([worker], lambda: not worker.runtime.has_work())
    # Assert: r decoded to the end; nothing paused
    assert [f.output_tokens for f in worker.of(m.Finished)] == [SAMPLING.max_new_tokens]
    assert not worker.of(m.Paused) and not worker.of(m.Failed)


def test_an_sp_group_paused_after_its_last_chunk_decodes_to_the_end(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: r prefills over the SP group (w0, w1), each member on its own thread as in
    # its own process; both see the Pause only after the last chunk ran
    chunk_tokens = 32
    num_chunks = -(-len(PROMPT) // chunk_tokens)
    cmd = m.SpPrefill("r", PROMPT, SAMPLING, chunk_tokens, False, "sp", ("w0", "w1"), pair[2])

    def member(worker: Worker) -> None:
        worker.handle(cmd)
        run_until([worker], lambda: not worker.runtime.joining)
        for _ in range(num_chunks):
            worker.step()
        worker.handle(m.Pause("r"))
        for _ in range(4 * SAMPLING.max_new_tokens):  # bounded: a paused group stops stepping
            if not worker.runtime.has_work():
                return
            worker.step()

    # Execute
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(member, w) for w in pair[:2]]:
            done.result(timeout=2 * TIMEOUT_S)
    # Assert: the group decoded to the end (rank 0 reports) and holds nothing
    reporter = pair[0]
    assert reporter.of(m.PrefillDone), reporter.reports
    assert [f.output_tokens for f in reporter.of(m.Finished)] == [SAMPLING.max_new_tokens]
    assert not reporter.of(m.Paused) and not any(w.of(m.Failed) for w in pair[:2])
    assert not any(w.runtime.load().resident_request_ids for w in pair[:2])


def test_a_worker_joining_an_sp_group_keeps_serving_and_a_cancel_aborts_the_join(
    pair: tuple[Worker, Worker, str],
) -> None:
    # Prepare: w0 decodes `running`, then joins an SP group whose other member never comes
    # (its node refused the request); a Pause of that request and a second SP request wait
    # behind the join, while a plain Prefill arriving meanwhile runs
    w0 = pair[0]
    w0.handle(m.Prefill("running", PROMPT, SamplingParams(max_new_tokens=200), 64, True))
    run_until([w0], lambda: w0.of(m.Tokens))

    def sp(rid: str) -> m.SpPrefill:
        return m.SpPrefill(
            rid, PROMPT, SAMPLING, 32, False, f"g/{rid}", ("w0", "w-absent"), pair[2]
        )

    w0.handle(sp("sp"))
    w0.handle(m.Pause("sp"))
    w0.handle(sp("sp2"))
    w0.handle(m.Prefill("during", PROMPT, SAMPLING, 64, True))
    tokens_before = sum(1 for t in w0.of(m.Tokens) if t.request_id == "running")

    # Execute: iterate while joining until `during` ends, then cancel both SP requests
    run_until([w0], lambda: w0.of(m.Finished))
    joined_meanwhile = w0.runtime.joining
    running_tokens = sum(1 for t in w0.of(m.Tokens) if t.request_id == "running")
    w0.handle(m.Cancel("sp"))
    joining_next = w0.runtime.joining
    w0.handle(m.Cancel("sp2", silent=True))

    # Assert: the plain requests ran during the join; each Cancel answered at once (well
    # inside the group timeout), the second SP request joined only after the first's ended
    assert joined_meanwhile and [f.request_id for f in w0.of(m.Finished)] == ["during"]
    assert running_tokens - tokens_before >= SAMPLING.max_new_tokens
    assert joining_next and not w0.runtime.joining
    assert w0.of(m.Cancelled) == [m.Cancelled("sp")]
    assert not w0.of(m.Failed) and not w0.of(m.Paused), w0.reports
    assert set(w0.runtime.load().resident_request_ids) == {"running"}
