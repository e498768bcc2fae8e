"""Store-level values: what the store keeps beyond the core's types, in domain terms.

The core schedules on `RequestSpec`/`RequestView` (counts, states, times). What a request also
carries to the data plane (prompt token ids, sampling) and what the cluster and the API need
(timeline, nodes, instance placement, API keys, paging) is defined here, as frozen values.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from controlplane.core.types import (
    InstanceSpec,
    RequestClass,
    RequestSpec,
    RequestState,
    RequestView,
)

# JSON-ready detail values of a timeline event.
DetailValue = str | int | float | bool | None

UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token (mirrors pecsched.v1.SamplingParams)."""

    temperature: float = 0.0  # 0 = greedy; > 0 samples with this temperature
    top_p: float = 0.0  # nucleus mass in (0, 1]; 0 = disabled
    seed: int = 0  # per-request generator seed, 0 <= seed <= 2**64 - 1
    stop_at_eos: bool = True  # stop at the model's end-of-sequence token

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not (0 <= self.top_p <= 1):
            raise ValueError(f"sampling.top_p: must be in [0, 1], got {self.top_p}")
        if not (0 <= self.seed <= UINT64_MAX):
            raise ValueError(f"sampling.seed: must be in [0, 2**64 - 1], got {self.seed}")


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request to persist at Submit: the core spec plus what only the data plane needs."""

    spec: RequestSpec  # id, tenant, sizes, priority, arrival, deadline
    request_class: RequestClass  # fixed at admission
    prompt_token_ids: Sequence[int]  # len == spec.prompt_tokens, each in [0, 2**32 - 1]
    sampling: SamplingParams = SamplingParams()
    idempotency_key: str | None = None  # unique per tenant; a replay returns the first request

    def __post_init__(self) -> None:
        if len(self.prompt_token_ids) != self.spec.prompt_tokens:
            raise ValueError(
                f"prompt_token_ids: {len(self.prompt_token_ids)} ids but "
                f"spec.prompt_tokens={self.spec.prompt_tokens}"
            )
        if self.idempotency_key == "":
            raise ValueError("idempotency_key: use None, not an empty string, for no key")


@dataclass(frozen=True, slots=True)
class AddResult:
    """Outcome of adding a request: the stored view, and whether this call created it."""

    view: RequestView  # the request as stored (the earlier one for an idempotent replay)
    created: bool  # False when (tenant, idempotency_key) matched an existing request


@dataclass(frozen=True, slots=True)
class StoredInputs:
    """What the data plane needs to (re)run a request."""

    prompt_token_ids: tuple[int, ...]  # the prompt
    sampling: SamplingParams  # how to sample
    idempotency_key: str | None  # as given at Submit


@dataclass(frozen=True, slots=True)
class UnfinishedRequest:
    """An unfinished request with everything recovery needs to queue it again."""

    view: RequestView  # as stored
    prompt_token_ids: array[int]  # packed uint32, as the runtime holds prompts
    sampling: SamplingParams
    output_token_ids: tuple[int, ...]  # generated and stored so far


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which requests `list_requests` returns; None/empty means any."""

    states: frozenset[RequestState] = frozenset()  # any of these states; empty = all
    request_class: RequestClass | None = None
    tenant: str | None = None


class ListOrder(StrEnum):
    """Direction of `list_requests` over the keyset (arrival_s, request_id)."""

    OLDEST_FIRST = "oldest_first"  # ascending, arrival order: the repository default
    NEWEST_FIRST = "newest_first"  # descending: what the List RPC promises its clients


@dataclass(frozen=True, slots=True)
class RequestPage:
    """One page of `list_requests`, ordered by (arrival_s, request_id) in the asked direction."""

    views: tuple[RequestView, ...]  # at most page_size requests
    next_page_token: str  # pass back for the next page; "" when this is the last page


class RequestEventKind(StrEnum):
    """Kinds of request timeline entries (docs/sql.md lists the `details` of each)."""

    QUEUED = "queued"  # accepted; details: request_class, prompt_tokens
    REQUEUED = "requeued"  # back in the queue; details: reason
    PREFILL_STARTED = "prefill_started"  # details: sp_degree, num_chunks, first_chunk_index
    COLOCATED = "colocated"  # short prefill inside a long decode; details: budget_tokens
    PREFILL_CHUNK_DONE = "prefill_chunk_done"  # details: chunk_index, num_chunks, duration_s
    # (+ iteration, iteration_tokens, chunk_tokens when the worker reports its iteration)
    PAUSED = "paused"  # details: reason, chunks_done
    RESUMED = "resumed"  # details: reason, paused_s
    PREFILL_DONE = "prefill_done"
    KV_TRANSFER_STARTED = "kv_transfer_started"  # details: src, dst
    KV_TRANSFER_DONE = "kv_transfer_done"  # details: dst, bytes, duration_s
    KV_TRANSFER_FAILED = "kv_transfer_failed"  # details: dst, error
    DECODE_STARTED = "decode_started"
    FIRST_TOKEN = "first_token"
    FINISHED = "finished"  # details: output_tokens
    CANCELLED = "cancelled"  # details: reason
    FAILED = "failed"  # details: error, retryable


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One entry of a request's lifecycle timeline."""

    request_id: str  # whose timeline
    kind: RequestEventKind  # what happened
    at_s: float  # when, on the control plane's clock
    instance_id: str | None = None  # where, when it happened on one instance
    details: Mapping[str, DetailValue] = field(default_factory=dict)  # kind-specific


class NodeState(StrEnum):
    """Whether a node's agent is attached."""

    UP = "up"
    DOWN = "down"


class InstanceState(StrEnum):
    """Serving state of an instance (mirrors pecsched.v1.InstanceState)."""

    UP = "up"
    DRAINING = "draining"  # finishing its work, takes nothing new
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A machine running one agent."""

    node_id: str  # stable id the agent registers with
    address: str  # where the agent can be reached (host:port), for operators
    state: NodeState
    registered_s: float  # when it (last) registered
    last_heartbeat_s: float  # latest heartbeat or stream message


@dataclass(frozen=True, slots=True)
class RegisteredInstance:
    """An instance as registered, with its placement and serving state."""

    spec: InstanceSpec  # id, node, role, tp, KV capacity
    state: InstanceState
    device_indices: tuple[int, ...]  # GPU indices on the node, one per TP rank; () on CPU
    updated_s: float  # when state or placement last changed

    def __post_init__(self) -> None:
        if self.device_indices and len(self.device_indices) != self.spec.tp:
            raise ValueError(
                f"device_indices: {len(self.device_indices)} devices but tp={self.spec.tp}"
            )
        if any(index < 0 for index in self.device_indices):
            raise ValueError(f"device_indices: must be >= 0, got {self.device_indices}")


class ApiKeyRole(StrEnum):
    """What an API key may do: clients submit and read their tenant's requests; admins all."""

    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key's identity and rights (never its secret)."""

    key_id: str  # public id, also embedded in the key string
    role: ApiKeyRole
    tenant: str  # the tenant its requests are accounted to
    created_s: float
    revoked_s: float | None = None  # when revoked; None while valid
