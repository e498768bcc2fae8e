"""Server streams end without the `ContextVar ... different Context` error (README "Known
problems").

When a client cancels a stream while the server is blocked sending to it (its flow-control
window full), grpc abandons the handler's async generator at its `yield`; asyncio closes it
later from a task of its own, in another Context. The auth interceptor used to `reset` its
principal ContextVar there, which raised `ValueError: <Token ...> was created in a different
Context`, logged by asyncio as "Task exception was never retrieved" (commit 337de3a stopped
resetting it; this test fails on the code before it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cp_harness import GENERAL, make_config, migrated_db, start_control_plane, submit_request
from cp_sim_agent import SimAgent, expected_token
from waiting import eventually

from controlplane.store.records import ApiKeyRole
from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.timeout(120)

# A client that buffers little and never widens its window: a stream it stops reading soon
# blocks the server in a send.
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
NUM_INSTANCES = 50  # a Watch snapshot of ~1.2 kB


def _context_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors logged about a context or a failed generator close. (grpc's own "ExecuteBatchError
    raised in core" for a send cut short by the cancel is expected.)"""
    found = []
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        if record.exc_info is not None:
            text += repr(record.exc_info[1])
        if "Context" in text or "never retrieved" in text:
            found.append(text)
    return found


async def _decoded(stub: inference_pb2_grpc.InferenceStub, rid: str, metadata: Any) -> bool:
    """The request decoded 500 tokens (1 s at a token per 2 ms): its unread stream and the
    Watch beside it (a snapshot per 50 ms) have had time to fill the client's window."""
    view = await stub.Get(inference_pb2.GetRequest(request_id=rid), metadata=metadata)
    return view.output_tokens >= 500


def _generators_closed() -> Callable[[], bool]:
    """A condition: three checks in a row (each after a collection, on a later loop turn) found
    no generator close pending. asyncio closes an abandoned async generator in a task it
    schedules when the generator is collected."""
    quiet = 0

    def check() -> bool:
        nonlocal quiet
        gc.collect()
        closing = [t for t in asyncio.all_tasks() if "athrow" in type(t.get_coro()).__name__]
        quiet = 0 if closing else quiet + 1
        return quiet >= 3

    return check


async def test_streams_end_and_cancel_without_context_errors(tmp_path, caplog):
    # Prepare: auth on (its interceptor wraps every stream), an agent decoding a token per 2 ms
    caplog.set_level(logging.ERROR)
    cp = await start_control_plane(make_config(migrated_db(tmp_path), auth_enabled=True))
    _, client_key = cp.repo.create_api_key(ApiKeyRole.CLIENT, "acme", 0.0)
    _, admin_key = cp.repo.create_api_key(ApiKeyRole.ADMIN, "ops", 0.0)
    instances = [(f"a{i}", GENERAL, 4096) for i in range(NUM_INSTANCES)]
    agent = SimAgent(cp.target, "node-a", instances, token_s=0.002, api_key=admin_key)
    await agent.start()
    as_client = (("authorization", f"Bearer {client_key}"),)
    as_admin = (("authorization", f"Bearer {admin_key}"),)
    try:
        async with grpc.aio.insecure_channel(cp.target, options=SLOW_READER) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            # Execute: a Generate stream read to its end; a Generate and a Watch stream left
            # unread until the server blocks, then cancelled
            done = await stub.Submit(
                submit_request([1, 2, 3], max_new_tokens=20), metadata=as_client
            )
            tokens, final = [], 0
            request = inference_pb2.GenerateRequest(request_id=done.request_id)
            async for chunk in stub.Generate(request, metadata=as_client):
                tokens.extend(chunk.token_ids)
                final = chunk.final_state or final
            for _ in range(2):
                long = await stub.Submit(
                    submit_request([4, 5], max_new_tokens=2000), metadata=as_client
                )
                request = inference_pb2.GenerateRequest(request_id=long.request_id)
                generate = stub.Generate(request, metadata=as_client)
                watch = stub.Watch(inference_pb2.WatchRequest(interval_s=0.05), metadata=as_admin)
                first_chunk, first_snapshot = await generate.read(), await watch.read()
                await eventually(
                    lambda rid=long.request_id: _decoded(stub, rid, as_client),
                    "the unread streams fill (500 tokens decoded, at least 1 s of snapshots)",
                )
                generate.cancel()
                watch.cancel()
            # asyncio closes the abandoned generators; a failed close is logged on collection
            await eventually(_generators_closed(), "the abandoned stream generators closed")

        # Assert
        assert final == common_pb2.REQUEST_STATE_FINISHED
        assert tokens == [expected_token([1, 2, 3], i) for i in range(20)]
        assert first_chunk.token_ids and len(first_snapshot.instances) == NUM_INSTANCES
        assert _context_errors(caplog) == []
    finally:
        await agent.stop()
        await cp.stop()
