"""KV transfer between two engines over a real gloo pair: equal tokens, failure, timeout, abort."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
from dist_utils import WorkerPool, shared_pool
from waiting import wait_until

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.types import Finished, KVExport, SamplingParams
from dataplane.models.loading import random_model
from dataplane.models.presets import preset_config
from dataplane.parallel.groups import Group, GroupManager
from dataplane.parallel.kv_transfer import (
    KVReceiver,
    KVSender,
    TransferState,
    metadata_from_bytes,
    metadata_header,
    metadata_to_bytes,
)

PROMPT = [(i * 37 + 11) % 320 for i in range(300)]
SAMPLING = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def pool() -> WorkerPool:
    return shared_pool(4)


def _engine() -> Engine:
    model = random_model(
        preset_config("tiny"), seed=0, dtype=torch.float32, device=torch.device("cpu")
    )
    return Engine(model, EngineConfig(chunk_tokens=128, kv_budget_bytes=4 << 20))


def _prefill_and_export(engine: Engine, request_id: str) -> KVExport:
    engine.add_request(request_id, PROMPT, SAMPLING, hold_after_prefill=True)
    while engine.has_runnable_work():
        engine.step()
    return engine.export_kv(request_id)


def _run_to_end(engine: Engine) -> tuple[int, ...]:
    while True:
        for event in engine.step():
            if isinstance(event, Finished):
                return event.output_token_ids


def _poll_until_final(
    transfer: KVSender | KVReceiver, limit_s: float = 60.0
) -> tuple[TransferState, float]:
    worst_poll_s = 0.0

    def polled_final() -> bool:
        nonlocal worst_poll_s
        if transfer.state in (TransferState.DONE, TransferState.FAILED):
            return True
        t0 = time.monotonic()
        transfer.poll()
        worst_poll_s = max(worst_poll_s, time.monotonic() - t0)
        return False

    wait_until(polled_final, "the transfer final (hung?)", limit_s, poll_s=0.001)
    return transfer.state, worst_poll_s


def _serve_short(engine: Engine) -> tuple[int, ...]:
    engine.add_request("short", PROMPT[:40], SamplingParams(max_new_tokens=3))
    return _run_to_end(engine)


def _signal(group: Group, manager: GroupManager, name: str) -> None:
    """Tell the other rank that `name` happened (a key in the pool's shared store)."""
    manager.store.set(f"{group.group_id}/{name}", "1")


def _until(group: Group, manager: GroupManager, name: str) -> None:
    """Wait until the other rank signalled `name`."""
    manager.store.wait([f"{group.group_id}/{name}"], timedelta(seconds=60))


def _transfer_job(group: Group, manager: GroupManager, mode: str) -> Any:
    torch.set_num_threads(1)
    engine = _engine()
    if group.rank == 0:
        export = _prefill_and_export(engine, "r1")
        if mode == "sender_stuck":
            _until(group, manager, "receiver-ended")  # alive but silent until it timed out
            return None
        if mode == "sender_dies":  # a hand-driven sender that dies after layer 0's keys
            raw = torch.frombuffer(bytearray(metadata_to_bytes(export.metadata)), dtype=torch.uint8)
            for t in (torch.tensor([raw.numel()]), raw, export.keys[0].contiguous()):
                group.send(t, 1).wait()
            os._exit(1)
        sender = KVSender(group, 1, export, timeout_s=30.0)
        t0 = time.monotonic()
        state, _ = _poll_until_final(sender)
        if mode == "no_room":
            elapsed_s = time.monotonic() - t0
            _signal(group, manager, "sender-ended")
            return state, sender.failure(), elapsed_s
        engine.resume("r1")  # decode in place for the reference tokens
        return state, _run_to_end(engine)
    if mode == "no_room":  # the decode worker is full: begin_import refuses
        engine.add_request("big", [1] * 8000, SamplingParams(max_new_tokens=1))
    free_before = engine.num_free_kv_tokens
    timeout_s = 1.5 if mode == "sender_stuck" else 30.0
    receiver = KVReceiver(
        group,
        0,
        engine.begin_import,
        engine.finish_import,
        engine.cancel,
        timeout_s=timeout_s,
    )
    t0 = time.monotonic()
    if mode == "abort":
        while receiver.metadata is None:
            receiver.poll()
        receiver.abort()
        state, worst_poll_s = receiver.state, 0.0
    else:
        state, worst_poll_s = _poll_until_final(receiver)
    elapsed_s = time.monotonic() - t0
    if mode == "sender_stuck":
        _signal(group, manager, "receiver-ended")
    if state is TransferState.DONE:
        return state, _run_to_end(engine), worst_poll_s
    if mode == "no_room":
        _until(group, manager, "sender-ended")  # the group lives on: the sender fails on its own
        return state, receiver.failure()
    freed = engine.num_free_kv_tokens == free_before and engine.num_requests == 0
    return state, receiver.failure(), elapsed_s, freed, _serve_short(engine)


def test_transferred_kv_decodes_to_the_same_tokens_as_in_place(pool: WorkerPool) -> None:
    # Execute
    sender, receiver = pool.run(_transfer_job, [0, 1], "ok")

    # Assert
    assert sender[0] is TransferState.DONE and receiver[0] is TransferState.DONE
    assert len(set(sender[1])) > 2, "random model degenerate: tokens must vary"
    assert receiver[1] == sender[1]
    assert receiver[2] < 0.5, "poll() must not block"


def test_sender_killed_mid_transfer_fails_receiver_frees_rows_and_keeps_serving(
    pool: WorkerPool,
) -> None:
    # Execute
    _, receiver = pool.run(_transfer_job, [0, 1], "sender_dies", expect=1)
    pool.restart(0)

    # Assert
    state, failure, elapsed_s, freed, short_tokens = receiver
    assert state is TransferState.FAILED and "kv transfer failed" in failure
    assert elapsed_s < 10.0
    assert freed and len(short_tokens) == 3


def test_silent_sender_times_out_and_receiver_keeps_serving(pool: WorkerPool) -> None:
    # Execute
    _, receiver = pool.run(_transfer_job, [0, 1], "sender_stuck")

    # Assert
    state, failure, elapsed_s, freed, short_tokens = receiver
    assert state is TransferState.FAILED and "timed out" in failure
    assert 1.4 < elapsed_s < 3.0
    assert freed and len(short_tokens) == 3


def test_abort_after_metadata_frees_the_reserved_rows(pool: WorkerPool) -> None:
    # Execute
    _, receiver = pool.run(_transfer_job, [0, 1], "abort", expect=2)

    # Assert
    state, failure, _, freed, short_tokens = receiver
    assert state is TransferState.FAILED and failure == "aborted"
    assert freed and len(short_tokens) == 3


def test_metadata_round_trips_and_malformed_bytes_name_the_field() -> None:
    # Prepare
    engine = _engine()
    meta = _prefill_and_export(engine, "r9").metadata
    header = metadata_header(meta)
    no_id = json.dumps({k: v for k, v in header.items() if k != "request_id"}).encode()
    short_ids = json.dumps(header | {"num_prompt_tokens": 3, "num_output_tokens": 0}).encode()

    # Execute
    raw = metadata_to_bytes(meta)
    back = metadata_from_bytes(raw)

    # Assert
    assert back == meta
    assert len(raw) < 4 * (len(meta.prompt_token_ids) + len(meta.output_token_ids)) + 400
    with pytest.raises(ValueError, match="request_id"):
        metadata_from_bytes(struct.pack("<I", len(no_id)) + no_id)
    with pytest.raises(ValueError, match="num_prompt_tokens=3"):
        metadata_from_bytes(struct.pack("<I", len(short_ids)) + short_ids + bytes(8))
    with pytest.raises(ValueError, match="header length"):
        metadata_from_bytes(b"{}")
    with pytest.raises(ValueError, match="prompt_token_ids"):
        metadata_to_bytes(dataclasses.replace(meta, prompt_token_ids=(-1,)))


def test_receiver_without_room_fails_and_the_sender_learns_at_once(pool: WorkerPool) -> None:
    # Execute
    sender, receiver = pool.run(_transfer_job, [0, 1], "no_room")

    # Assert
    assert receiver[0] is TransferState.FAILED and "DOES_NOT_FIT" in receiver[1]
    assert sender[0] is TransferState.FAILED
    assert sender[2] < 2.5, "the sender must not wait for its 30 s timeout"
