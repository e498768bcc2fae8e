"""Commands the runtime sends to agents: the core's actions plus what the data plane needs.

These are the domain form of `pecsched.v1.Command` (controlplane/api/convert.py turns them
into protobuf). Each is addressed to one node; an action touching instances of several nodes
becomes one command per node, each naming every instance of the action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.core.types import SpKind
from controlplane.store.records import SamplingParams
from controlplane.telemetry import TraceContext


@dataclass(frozen=True, slots=True)
class PrefillOrder:
    """Prefill a prompt on an SP group (StartPrefill)."""

    request_id: str  # which request
    prompt_token_ids: Sequence[int]  # the prompt (packed uint32 in the runtime)
    instance_ids: tuple[str, ...]  # SP group in rank order; [0] samples the first token
    sp_kind: SpKind  # SP attention algorithm
    chunk_tokens: int  # tokens per chunk; pause points between chunks
    group_id: str  # rendezvous group id, unique per prefill attempt
    max_new_tokens: int  # output tokens in total (generated_token_ids included)
    sampling: SamplingParams  # how to sample
    decode_in_place: bool  # decode on the group right after prefill
    generated_token_ids: tuple[int, ...]  # output so far (continuation after a re-queue)
    rendezvous_address: str  # host:port where the group's members meet (`rendezvous_for`)


@dataclass(frozen=True, slots=True)
class ColocateOrder:
    """Run a prefill inside the iterations of its host (Colocate): a short one beside a long
    decode, or one of the host's mixed prefills (sarathi)."""

    prefill: PrefillOrder  # instance_ids == (host,)
    iteration_prefill_budget_tokens: int  # prompt tokens per decode iteration at most
    mixed_batch_tokens: int = 0  # > 0: the host's iterations take this many tokens in all at
    # most while it prefills, decodes included (the policy's budget; see actions.Colocate)


@dataclass(frozen=True, slots=True)
class PauseOrder:
    """Pause a prefill at its next chunk boundary (KV stays resident)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class ResumeOrder:
    """Resume a paused prefill from its first chunk not yet done."""

    request_id: str


@dataclass(frozen=True, slots=True)
class TransferOrder:
    """Stream KV from the source instance to the destination instance (TransferKv)."""

    request_id: str
    transfer_id: str  # unique per attempt; agents report progress under it
    source_instance_id: str
    destination_instance_id: str
    group_id: str  # rendezvous group of the pair
    rendezvous_address: str  # host:port of the source node's rendezvous store
    timeout_s: float  # give up (and report FAILED) after this long


@dataclass(frozen=True, slots=True)
class DecodeOrder:
    """Start decoding on an instance that holds the whole KV (StartDecode)."""

    request_id: str
    instance_id: str  # where to decode; the agent names it when it refuses the command
    transfer_id: str  # the finished transfer that brought the KV; "" when prefilled there
    max_new_tokens: int
    sampling: SamplingParams
    generated_token_ids: tuple[int, ...]  # tokens so far (at least the prefill's first token)


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """Stop every piece of work of the request and free its KV on this node."""

    request_id: str


@dataclass(frozen=True, slots=True)
class ShutdownOrder:
    """Stop the agent (after finishing its work when `drain`)."""

    drain: bool


Order = (
    PrefillOrder
    | ColocateOrder
    | PauseOrder
    | ResumeOrder
    | TransferOrder
    | DecodeOrder
    | CancelOrder
    | ShutdownOrder
)


@dataclass(frozen=True, slots=True)
class AgentCommand:
    """One order for one node, with the trace context of its dispatch."""

    node_id: str  # the agent (node) it goes to
    order: Order  # what to do
    request_id: str  # whose work ("" for node-wide orders)
    trace: TraceContext | None  # context of the decision span; dispatch makes a child of it
