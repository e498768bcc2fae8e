"""Every conversion between wire messages (protos) and the worker's values, in one place."""

from __future__ import annotations

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
    event = cluster_pb2.Event(instance_id=instance_id, at_s=at_s)
    if isinstance(report, m.ChunkDone):
        event.chunk_done.CopyFrom(
            cluster_pb2.PrefillChunkDone(
                chunk_index=report.chunk_index,
                chunks_total=report.chunks_total,
                tokens_done=report.tokens_done,
                duration_s=report.duration_s,
                iteration=report.iteration,
                iteration_tokens=report.iteration_tokens,
                chunk_tokens=report.chunk_tokens,
            )
        )
    elif isinstance(report, m.PrefillDone):
        event.prefill_done.CopyFrom(
            cluster_pb2.PrefillDone(
                prompt_tokens=prompt_tokens, first_token_id=report.first_token_id
            )
        )
    elif isinstance(report, m.Paused):
        event.paused.CopyFrom(cluster_pb2.Paused(chunks_done=report.chunks_done))
    elif isinstance(report, m.Tokens):
        event.tokens.CopyFrom(
            cluster_pb2.Tokens(
                start_index=report.start_index + offset_tokens, token_ids=list(report.token_ids)
            )
        )
    elif isinstance(report, m.Finished):
        event.finished.CopyFrom(
            cluster_pb2.Finished(
                output_tokens=report.output_tokens + offset_tokens, reason=report.reason
            )
        )
    elif isinstance(report, m.Failed):
        event.failed.CopyFrom(failed_proto(report.error, report.retryable))
    elif isinstance(report, m.Cancelled):
        event.cancelled.CopyFrom(cluster_pb2.Cancelled())
    elif isinstance(report, m.TransferUpdate):
        event.kv_transfer.CopyFrom(
            cluster_pb2.KvTransferUpdate(
                transfer_id=report.transfer_id,
                state=_TRANSFER_TO_PROTO[report.state],
                destination_instance_id=destination_instance_id,
                bytes=report.num_bytes,
                duration_s=report.duration_s,
                error=report.error,
            )
        )
    else:
        return None
    event.request_id = report.request_id
    return event


def failed_proto(error: str, retryable: bool) -> cluster_pb2.Failed:
    """A Failed body."""
    return cluster_pb2.Failed(error=error, retryable=retryable)
