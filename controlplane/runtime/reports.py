"""What agents report about requests: the domain form of `pecsched.v1.Event`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class PrefillChunkDone:
    """A prefill chunk finished on the whole SP group (reported by rank 0)."""

    chunk_index: int  # 0-based
    chunks_total: int  # chunks the agent planned
    duration_s: float  # how long the chunk ran
    iteration: int = 0  # the worker iteration that ran it (0: not reported)
    iteration_tokens: int = 0  # tokens that iteration ran, decodes + every prefill chunk
    chunk_tokens: int = 0  # prompt tokens of this chunk (0: not reported)


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The whole prompt is prefilled; `first_token_id` is output token `len(generated)`."""

    first_token_id: int


@dataclass(frozen=True, slots=True)
class Paused:
    """The prefill paused at a chunk boundary (acknowledges a Pause)."""

    chunks_done: int


class TransferState(StrEnum):
    """Progress of a KV transfer (mirrors pecsched.v1.TransferState)."""

    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class KvTransferUpdate:
    """A KV transfer moved on; DONE and FAILED end it."""

    transfer_id: str
    state: TransferState
    destination_instance_id: str
    num_bytes: int
    duration_s: float
    error: str


@dataclass(frozen=True, slots=True)
class Tokens:
    """Generated tokens `start_index ..` of the request's output."""

    start_index: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The request stopped at max_new_tokens ("length") or EOS ("eos")."""

    output_tokens: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The request's work failed on the agent; `retryable` re-queues it."""

    error: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The agent stopped the request's work (acknowledges a Cancel)."""


ReportBody = (
    PrefillChunkDone
    | PrefillDone
    | Paused
    | KvTransferUpdate
    | Tokens
    | Finished
    | Failed
    | Cancelled
)


@dataclass(frozen=True, slots=True)
class AgentReport:
    """One event about one request from one instance of a node."""

    node_id: str  # the reporting agent
    request_id: str  # whose work
    instance_id: str  # which instance it happened on
    body: ReportBody  # what happened
    received_s: float  # when the control plane received it (its clock)
