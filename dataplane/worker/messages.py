"""Messages between the agent and its worker processes: picklable frozen values, no protos.

Agent -> worker: the `WorkerCommand` variants. Worker -> agent: the `WorkerReport` variants.
Every report names the request (where there is one); the agent adds the instance id and the
wire framing (`dataplane.agent.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.engine.types import SamplingParams

# ---------------------------------------------------------------- agent -> worker


@dataclass(frozen=True, slots=True)
class Prefill:
    """Admit a request and prefill it in chunks on this worker (sp_degree 1)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # the prompt (after a re-queue: + tokens generated before)
    sampling: SamplingParams  # max_new_tokens: tokens still to generate
    chunk_tokens: int  # prompt tokens per iteration for this request (>= 1)
    decode_in_place: bool  # decode here afterwards; False: hold the KV for a transfer
    batch_tokens: int = 0  # > 0: while it prefills, tokens per iteration in all at most (mixed)


@dataclass(frozen=True, slots=True)
class SpPrefill:
    """This worker's part of a sequence-parallel prefill (then decode on the same group)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # the whole prompt (every member embeds only its shard)
    sampling: SamplingParams  # max_new_tokens: tokens still to generate
    chunk_tokens: int  # prompt tokens per chunk, over the whole group (>= 1)
    ring: bool  # ring attention instead of Ulysses
    group_id: str  # rendezvous id of the SP group
    member_ids: tuple[str, ...]  # instance ids in rank order; rank 0 reports progress
    store_address: str  # host:port of the rendezvous store


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop the request's prefill at the next chunk boundary; KV stays resident. Dropped once
    the prefill is done (only prefills pause)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Resume:
    """Continue a paused request where it stopped."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Drop the request in any state (aborting its transfers) and free its KV."""

    request_id: str
    silent: bool = False  # True: report nothing (a drop ordered at re-registration)


@dataclass(frozen=True, slots=True)
class SendKv:
    """Send a held request's KV to `peer_member_id`; free it when done (see worker.transfers)."""

    request_id: str
    transfer_id: str
    group_id: str  # id the pair's group gets if this transfer creates it (source rank 0)
    peer_member_id: str  # destination instance id
    store_address: str  # host:port of the rendezvous store
    timeout_s: float
    same_node: bool = False  # the peer is a worker of this node (CUDA: IPC, no group)


@dataclass(frozen=True, slots=True)
class RecvKv:
    """Receive a request's KV from `peer_member_id`; it waits for StartDecode once complete."""

    request_id: str
    transfer_id: str
    group_id: str
    peer_member_id: str  # source instance id
    store_address: str
    timeout_s: float
    same_node: bool = False


@dataclass(frozen=True, slots=True)
class StartDecode:
    """Decode a request whose KV is here (after RecvKv, possibly still in flight)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit the worker loop (the agent has handed back or finished everything)."""


WorkerCommand = Prefill | SpPrefill | Pause | Resume | Cancel | SendKv | RecvKv | StartDecode | Stop

# ---------------------------------------------------------------- worker -> agent


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker loaded its model and KV pool and takes commands."""

    kv_capacity_tokens: int  # rows in the KV pool
    device: str  # e.g. "cpu" or "cuda:NVIDIA H100 80GB HBM3"
    eos_token_ids: tuple[int, ...]  # the model's end-of-sequence tokens
    pid: int  # the worker's process id (logged by the agent)
    vocab_size: int = 0  # the model's vocabulary size (token ids are below it)


@dataclass(frozen=True, slots=True)
class PrefillChunkDone:
    """A prefill chunk ran."""

    request_id: str
    chunk_index: int  # 0-based index of this chunk
    chunks_total: int  # chunks the prompt takes at this request's chunk size
    tokens_done: int  # prompt tokens with KV resident
    duration_s: float  # wall time of the iteration that ran it
    iteration: int = 0  # the engine iteration that ran it (from 1); 0: not reported (SP)
    iteration_tokens: int = 0  # tokens that iteration ran (decodes + every prefill chunk)
    chunk_tokens: int = 0  # prompt tokens of this chunk


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The whole prompt is resident and the first token was sampled."""

    request_id: str
    prompt_tokens: int
    first_token_id: int


@dataclass(frozen=True, slots=True)
class Paused:
    """The request is paused; resume continues with chunk `chunks_done`."""

    request_id: str
    chunks_done: int


@dataclass(frozen=True, slots=True)
class Tokens:
    """Generated tokens; `start_index` is the output index of token_ids[0]."""

    request_id: str
    start_index: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The request stopped; its KV is freed."""

    request_id: str
    output_tokens: int  # the whole output, tokens generated before a re-queue included
    reason: str  # "length" or "eos"


@dataclass(frozen=True, slots=True)
class Failed:
    """A command or the request failed on this worker; its KV is freed."""

    request_id: str
    error: str
    retryable: bool  # True: the request may run again elsewhere


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The request is gone from this worker (KV freed, transfers aborted)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class KvTransferUpdate:
    """Progress of a KV transfer as seen by this side (source or destination)."""

    request_id: str
    transfer_id: str
    state: str  # "transferring" | "done" | "failed"
    is_source: bool  # reported by the sending side
    num_bytes: int  # KV bytes moved so far
    duration_s: float  # since the transfer started on this side
    error: str  # empty unless failed


@dataclass(frozen=True, slots=True)
class Load:
    """The worker's load, sent after work and at least every load interval while busy."""

    kv_used_tokens: int  # KV rows reserved by resident requests
    running_requests: int  # resident requests (any state)
    busy_total_s: float  # seconds spent in engine steps since the worker started
    resident_request_ids: tuple[str, ...]  # requests holding KV here


WorkerReport = (
    Ready
    | PrefillChunkDone
    | PrefillDone
    | Paused
    | Tokens
    | Finished
    | Failed
    | Cancelled
    | KvTransferUpdate
    | Load
)
