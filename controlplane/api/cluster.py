"""`pecsched.v1.Cluster` servicer: the agents' Attach stream.

Protocol (agents must match; docs/deploying.md has the long form):

1. The agent opens Attach with an admin API key and sends `Register` first, within
   `registration_timeout_s` (else the stream fails with FAILED_PRECONDITION).
2. The control plane answers `Registered(heartbeat_interval_s, drop_request_ids)`. Every id of
   `resident_request_ids` is listed in `drop_request_ids`: work held from before a reconnect
   was already re-queued, so the agent frees it and must not report on it again.
3. The agent sends a `Heartbeat` every `heartbeat_interval_s` (any message counts as proof of
   life); after 3 intervals of silence, or when the stream breaks, the agent is lost: its
   requests are re-queued and the stream is closed. The agent reconnects and registers again.
4. `AgentMessage.seq` increases by one per message of a stream (0 = unnumbered); messages
   with a seq not above the last one applied are dropped as duplicates.
5. Events: rank 0 of an SP group reports `chunk_done`, `prefill_done` (its first_token_id is
   output token number len(StartPrefill.generated_token_ids)), `paused`; the source instance
   reports `kv_transfer` progress under the command's transfer_id (DONE or FAILED ends it);
   the decoding instance reports `tokens` (start_index = index in the whole output, repeats
   are ignored, gaps are dropped) and `finished`; `failed(retryable)` re-queues the request.
   Events from an instance that no longer holds the request's work are ignored.
6. Commands: StartPrefill/Colocate go to every node of the group, each naming the whole group,
   its group_id and where the members meet (rendezvous_address: the store of rank 0's
   node); TransferKv to the source
   and the destination node; StartDecode to the decoding node (transfer_id empty: decode
   where the prefill ran; else on the transfer's destination); Cancel to every node holding
   work or KV. `Command.trace` carries the W3C context of the dispatch span.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from controlplane.api import convert
from controlplane.api.auth import current_principal, require_admin
from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.api.recipe import Traced, rpc
from controlplane.runtime.agents import AgentSession
from controlplane.runtime.loop import Runtime
from controlplane.telemetry import ATTR_NODE_ID, SPAN_RPC, Span, Telemetry
from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc

_log = logging.getLogger(__name__)


class ClusterServicer(cluster_pb2_grpc.ClusterServicer, Traced):
    """Agent-facing API: one Attach stream per node."""

    def __init__(self, runtime: Runtime, telemetry: Telemetry) -> None:
        self.runtime = runtime
        self.telemetry = telemetry

    @rpc(SPAN_RPC)
    async def Attach(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any, span: Span
    ) -> AsyncIterator[cluster_pb2.ControlMessage]:
        """Register, then exchange commands and events until the agent is lost."""
        require_admin(current_principal(), "Attach")
        runtime = self.runtime
        try:
            first = await asyncio.wait_for(
                anext(request_iterator), runtime.settings.registration_timeout_s
            )
        except (TimeoutError, StopAsyncIteration) as exc:
            raise ApiError(
                ApiErrorCode.PROTOCOL_VIOLATION,
                "register: the first message of Attach must be Register",
                field="register",
            ) from exc
        if first.WhichOneof("body") != "register":
            raise ApiError(
                ApiErrorCode.PROTOCOL_VIOLATION,
                "register: the first message of Attach must be Register",
                field="register",
            )
        registration, join = convert.registration_from_proto(
            first.register, context.peer(), runtime.clock.now_s()
        )
        span.set_attribute(ATTR_NODE_ID, registration.node_id)
        session = runtime.attach(registration, join)
        session.accept_seq(first.seq)
        _log.info("agent %s attached with %d instances", session.node_id, len(join.instances))
        seq = 1
        yield convert.registered_to_proto(
            seq, runtime.settings.heartbeat_interval_s, registration.resident_request_ids
        )
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            while True:
                command = await session.outbox.get()
                if command is None:
                    break
                seq += 1
                yield convert.command_to_proto(command, seq)
            refused = reader.result() if reader.done() else None
            if refused is not None:  # the stream ends with the status naming the bad field
                raise refused
        finally:
            reader.cancel()
            runtime.detach(session, "stream closed")
            _log.info("agent %s detached: %s", session.node_id, session.closed_reason)

    async def _read(self, request_iterator: Any, session: AgentSession) -> ApiError | None:
        """Apply the agent's messages until the stream ends; returns the error of a message
        refused by the field limits (the agent is detached)."""
        runtime = self.runtime
        try:
            async for message in request_iterator:
                if not session.is_live:
                    return None
                runtime.heard_from(session)
                if not session.accept_seq(message.seq):
                    continue
                body = message.WhichOneof("body")
                if body == "heartbeat":
                    for load in message.heartbeat.loads:
                        runtime.record_busy(load.instance_id, load.busy_s)
                elif body == "event":
                    try:
                        report = convert.report_from_proto(
                            message.event, session.node_id, runtime.clock.now_s()
                        )
                    except ApiError as exc:
                        _log.warning("agent %s: bad event dropped: %s", session.node_id, exc)
                        continue
                    runtime.report(session, report)
                elif body == "register":
                    _log.warning("agent %s registered twice on one stream", session.node_id)
                    runtime.detach(session, "protocol violation: Register sent twice")
                    return None
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            _log.warning("agent %s sent a message out of limits: %s", session.node_id, exc)
            return exc
        except Exception as exc:  # a broken stream is an agent loss, not a server error
            _log.info("agent %s stream ended: %r", session.node_id, exc)
        finally:
            runtime.detach(session, "stream closed")
        return None
