"""Every conversion between wire messages (protos) and the worker's values, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from dataplane.engine.types import SamplingParams
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2, common_pb2

ROLE_TO_PROTO = {
    "general": common_pb2.INSTANCE_ROLE_GENERAL,
    "short_decode": common_pb2.INSTANCE_ROLE_SHORT_DECODE,
    "long_reserved": common_pb2.INSTANCE_ROLE_LONG_RESERVED,
}

_TRANSFER_TO_PROTO = {
    "transferring": common_pb2.TRANSFER_STATE_TRANSFERRING,
    "done": common_pb2.TRANSFER_STATE_DONE,
    "failed": common_pb2.TRANSFER_STATE_FAILED,
}


def sampling_from_proto(
    sampling: common_pb2.SamplingParams, max_new_tokens: int, eos_token_ids: tuple[int, ...]
) -> SamplingParams:
    """Proto sampling + limits -> engine SamplingParams; ValueError names the bad field."""
    stop_at_eos = sampling.stop_at_eos if sampling.HasField("stop_at_eos") else True
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p) if sampling.top_p > 0 else 1.0,
            seed=int(sampling.seed),
            eos_token_ids=eos_token_ids if stop_at_eos else (),
        )
    except ValueError as exc:
        raise ValueError(f"sampling: {exc}") from exc


def instance_spec_to_proto(
    instance_id: str, role: str, device_index: int, ready: m.Ready
) -> cluster_pb2.InstanceSpec:
    """One worker's InstanceSpec (tp = 1)."""
    return cluster_pb2.InstanceSpec(
        instance_id=instance_id,
        role=ROLE_TO_PROTO[role],
        tp=1,
        device_indices=[device_index],
        kv_capacity_tokens=ready.kv_capacity_tokens,
        device=ready.device,
    )


def report_to_event(
    report: m.WorkerReport,
    instance_id: str,
    at_s: float,
    offset_tokens: int,
    prompt_tokens: int,
    destination_instance_id: str = "",
) -> cluster_pb2.Event | None:
    """The wire Event for a worker report (None for reports that are not events).

    `offset_tokens` (tokens generated before a re-queue) is added to output indices and counts;
    `prompt_tokens` is the request's original prompt length for PrefillDone.
    """
    to_body = _EVENT_BODIES.get(type(report))
    if to_body is None:
        return None
    field, body = to_body(report, _Context(offset_tokens, prompt_tokens, destination_instance_id))
    event = cluster_pb2.Event(instance_id=instance_id, at_s=at_s)
    getattr(event, field).CopyFrom(body)
    event.request_id = report.request_id  # type: ignore[union-attr]  # every report above has one
    return event


@dataclass(frozen=True, slots=True)
class _Context:
    """What an event body needs beyond its report (see `report_to_event`)."""

    offset_tokens: int
    prompt_tokens: int
    destination_instance_id: str


def _chunk_done(r: m.PrefillChunkDone, c: _Context) -> tuple[str, Message]:
    return "chunk_done", cluster_pb2.PrefillChunkDone(
        chunk_index=r.chunk_index,
        chunks_total=r.chunks_total,
        tokens_done=r.tokens_done,
        duration_s=r.duration_s,
        iteration=r.iteration,
        iteration_tokens=r.iteration_tokens,
        chunk_tokens=r.chunk_tokens,
    )


def _prefill_done(r: m.PrefillDone, c: _Context) -> tuple[str, Message]:
    body = cluster_pb2.PrefillDone(prompt_tokens=c.prompt_tokens, first_token_id=r.first_token_id)
    return "prefill_done", body


def _paused(r: m.Paused, c: _Context) -> tuple[str, Message]:
    return "paused", cluster_pb2.Paused(chunks_done=r.chunks_done)


def _tokens(r: m.Tokens, c: _Context) -> tuple[str, Message]:
    start = r.start_index + c.offset_tokens
    return "tokens", cluster_pb2.Tokens(start_index=start, token_ids=list(r.token_ids))


def _finished(r: m.Finished, c: _Context) -> tuple[str, Message]:
    output_tokens = r.output_tokens + c.offset_tokens
    return "finished", cluster_pb2.Finished(output_tokens=output_tokens, reason=r.reason)


def _failed(r: m.Failed, c: _Context) -> tuple[str, Message]:
    return "failed", failed_proto(r.error, r.retryable)


def _cancelled(r: m.Cancelled, c: _Context) -> tuple[str, Message]:
    return "cancelled", cluster_pb2.Cancelled()


def _kv_transfer(r: m.KvTransferUpdate, c: _Context) -> tuple[str, Message]:
    return "kv_transfer", cluster_pb2.KvTransferUpdate(
        transfer_id=r.transfer_id,
        state=_TRANSFER_TO_PROTO[r.state],
        destination_instance_id=c.destination_instance_id,
        bytes=r.num_bytes,
        duration_s=r.duration_s,
        error=r.error,
    )


# report type -> the Event's field and body; a report type not here is no event
_EVENT_BODIES: dict[type, Callable[[Any, _Context], tuple[str, Message]]] = {
    m.PrefillChunkDone: _chunk_done,
    m.PrefillDone: _prefill_done,
    m.Paused: _paused,
    m.Tokens: _tokens,
    m.Finished: _finished,
    m.Failed: _failed,
    m.Cancelled: _cancelled,
    m.KvTransferUpdate: _kv_transfer,
}


def failed_proto(error: str, retryable: bool) -> cluster_pb2.Failed:
    """A Failed body."""
    return cluster_pb2.Failed(error=error, retryable=retryable)
