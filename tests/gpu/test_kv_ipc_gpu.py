"""KV transfer over CUDA IPC between two processes on one GPU: the transferred request decodes
exactly as in place; a sender that aborts, or never offers, leaves the receiver's rows free.

The sender runs in a spawned process (its own CUDA context, as a worker); the receiver is this
process. Both build the same seeded `tiny` model in bfloat16.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch
from waiting import wait_until

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.types import Finished, SamplingParams, TokenGenerated
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config
from dataplane.parallel.groups import connect_store
from dataplane.parallel.kv_ipc import IpcKVReceiver, IpcKVSender, IpcRegistry
from dataplane.parallel.kv_transfer import TransferState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPT = [(i * 37 + 11) % 256 for i in range(300)]
SAMPLING = SamplingParams(max_new_tokens=16)
TIMEOUT_S = 60.0


def _engine() -> Engine:
    model = random_model(
        preset_config("tiny"), seed=0, dtype=torch.bfloat16, device=torch.device("cuda:0")
    )
    return Engine(model, EngineConfig(chunk_tokens=128, kv_budget_bytes=64 << 20))


def _sender_main(port: int, key: str, mode: str, results: Any) -> None:
    """Prefill `r`, then offer its KV (mode "send") or offer and abort at once ("abort")."""
    torch.cuda.set_device(0)
    engine = _engine()
    engine.add_request("r", PROMPT, SAMPLING, hold_after_prefill=True)
    while engine.has_runnable_work():
        engine.step()
    store = connect_store("127.0.0.1", port, TIMEOUT_S)
    sender = IpcKVSender(
        store, key, engine.export_kv("r"), IpcRegistry(torch.device("cuda:0")), timeout_s=30.0
    )
    if mode == "abort":
        sender.abort()
    wait_until(
        lambda: sender.poll() is not TransferState.TRANSFERRING,
        "the send ended (its own timeout is 30 s)",
        90,
        poll_s=0.001,
    )
    results.put((sender.state.name, sender.num_bytes, sender.failure()))


def _decode(engine: Engine, request_id: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_runnable_work():
        for event in engine.step():
            if isinstance(event, TokenGenerated) and event.request_id == request_id:
                tokens.append(event.token_id)
            if isinstance(event, Finished) and event.request_id == request_id:
                return tokens
    return tokens


def _receive(engine: Engine, store: Any, key: str, timeout_s: float) -> IpcKVReceiver:
    receiver = IpcKVReceiver(
        store,
        key,
        IpcRegistry(torch.device("cuda:0")),
        engine.reserve_import,
        engine.attach_import,
        engine.finish_import,
        engine.cancel,
        timeout_s=timeout_s,
    )
    wait_until(
        lambda: receiver.poll() in (TransferState.DONE, TransferState.FAILED),
        f"the receive ended (its own timeout is {timeout_s} s)",
        timeout_s + 60,
        poll_s=0.001,
    )
    return receiver


@pytest.fixture
def store() -> Any:
    return connect_store("127.0.0.1", 0, TIMEOUT_S, is_master=True)


def _spawn(store: Any, key: str, mode: str) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_sender_main, args=(store.port, key, mode, results))
    proc.start()
    return proc, results


def test_kv_copied_over_ipc_decodes_exactly_as_in_place(store: Any) -> None:
    # Prepare: the reference decodes in place on this process's engine
    engine = _engine()
    engine.add_request("ref", PROMPT, SAMPLING)
    expected = _decode(engine, "ref")
    free_before = engine.num_free_kv_tokens
    proc, results = _spawn(store, "t-ok", "send")

    # Execute
    receiver = _receive(engine, store, "t-ok", TIMEOUT_S)
    sent = results.get(timeout=TIMEOUT_S)
    proc.join(timeout=TIMEOUT_S)
    generated = _decode(engine, "r")

    # Assert: the first token came with the KV, the rest equal the in-place decode
    assert receiver.state is TransferState.DONE, receiver.failure()
    assert sent[0] == "DONE" and sent[1] == receiver.num_bytes > 0
    assert generated == expected[1:]
    assert engine.num_free_kv_tokens == free_before


def test_a_sender_that_aborts_leaves_the_receiver_failed_and_its_rows_free(store: Any) -> None:
    # Prepare
    engine = _engine()
    free_before = engine.num_free_kv_tokens
    proc, results = _spawn(store, "t-abort", "abort")

    # Execute
    sent = results.get(timeout=TIMEOUT_S)
    receiver = _receive(engine, store, "t-abort", TIMEOUT_S)
    proc.join(timeout=TIMEOUT_S)

    # Assert
    assert sent[0] == "FAILED" and "aborted" in sent[2]
    assert receiver.state is TransferState.FAILED and "aborted" in (receiver.failure() or "")
    assert engine.num_free_kv_tokens == free_before


def test_a_receiver_whose_sender_never_offers_times_out_with_nothing_reserved(
    store: Any,
) -> None:
    # Prepare
    engine = _engine()
    free_before = engine.num_free_kv_tokens

    # Execute
    receiver = _receive(engine, store, "t-silent", timeout_s=0.5)

    # Assert
    assert receiver.state is TransferState.FAILED and "timed out" in (receiver.failure() or "")
    assert engine.num_free_kv_tokens == free_before
