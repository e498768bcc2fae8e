"""Value types of the scheduling core: enums, request/instance specs and read-only views.

All values are frozen slotted dataclasses; enums are string-valued so they persist as readable
text. Units are in the field names (`*_s` seconds on the driver's clock, `*_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from controlplane.core.errors import InvalidArgumentError


class RequestState(StrEnum):
    """Where a request is in its lifecycle (rules in controlplane/core/lifecycle.py)."""

    QUEUED = "queued"  # admitted, waiting for a prefill slot
    PREFILLING = "prefilling"  # prefill chunks running on one instance or an SP group
    PAUSED = "paused"  # long prefill preempted at a chunk boundary; KV resident
    TRANSFERRING_KV = "transferring_kv"  # prefill done; KV waiting for / streaming to a decoder
    DECODING = "decoding"  # generating tokens
    FINISHED = "finished"  # stopped at max_new_tokens or EOS
    CANCELLED = "cancelled"  # cancelled by a client, an admin or its deadline
    FAILED = "failed"  # could not be served (rejected at admission, or a fatal error)

    @property
    def is_terminal(self) -> bool:
        """True for FINISHED, CANCELLED and FAILED: no transition leaves these."""
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED})


class RequestClass(StrEnum):
    """Length class, fixed at admission: SHORT when the prompt is below the threshold."""

    SHORT = "short"
    LONG = "long"


class InstanceRole(StrEnum):
    """What an instance is used for."""

    GENERAL = "general"  # prefills (short and long) and long decode
    SHORT_DECODE = "short_decode"  # decode of short requests, KV streamed in
    LONG_RESERVED = "long_reserved"  # reservation baseline: long requests only


class SpKind(StrEnum):
    """How sequence-parallel attention is computed over an SP group."""

    ULYSSES = "ulysses"  # all-to-all: sequence-sharded -> head-sharded -> attention -> back
    RING = "ring"  # ring P2P with online softmax


def classify(prompt_tokens: int, short_threshold_tokens: int) -> RequestClass:
    """Return SHORT when `prompt_tokens` is below `short_threshold_tokens`, else LONG."""
    return RequestClass.SHORT if prompt_tokens < short_threshold_tokens else RequestClass.LONG


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What a client asked for; immutable once admitted."""

    request_id: str  # unique id chosen by the control plane
    tenant: str  # tenant for quotas and accounting
    prompt_tokens: int  # prompt length in tokens, >= 1
    max_new_tokens: int  # tokens to generate at most, >= 1
    priority: int  # higher runs earlier within the same queue; 0 is the default
    arrival_s: float  # when the request was accepted, on the driver's clock
    deadline_s: float | None = None  # absolute completion deadline; None means none

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidArgumentError("request_id", "must not be empty")
        if self.prompt_tokens < 1:
            raise InvalidArgumentError("prompt_tokens", f"must be >= 1, got {self.prompt_tokens}")
        if self.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.arrival_s):
            raise InvalidArgumentError("arrival_s", f"must be finite, got {self.arrival_s}")
        if self.deadline_s is not None and not self.deadline_s > self.arrival_s:
            raise InvalidArgumentError(
                "deadline_s", f"must be after arrival_s={self.arrival_s}, got {self.deadline_s}"
            )

    @property
    def total_tokens(self) -> int:
        """KV tokens the request needs at most: prompt plus every generated token."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One model replica on `tp` GPUs of one node, as registered by its agent."""

    instance_id: str  # unique id, stable across agent reconnects
    node_id: str  # node (agent) hosting the replica
    role: InstanceRole  # requested role; a policy may give a GENERAL instance another role
    tp: int  # tensor-parallel degree = GPUs used by this replica, >= 1
    kv_capacity_tokens: int  # KV cache capacity in tokens, net of weights and activations

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise InvalidArgumentError("instance_id", "must not be empty")
        if self.tp < 1:
            raise InvalidArgumentError("tp", f"must be >= 1, got {self.tp}")
        if self.kv_capacity_tokens < 1:
            raise InvalidArgumentError(
                "kv_capacity_tokens", f"must be >= 1, got {self.kv_capacity_tokens}"
            )


@dataclass(frozen=True, slots=True)
class RequestView:
    """Read-only snapshot of one request as the core sees it (what repositories persist)."""

    spec: RequestSpec  # what was asked
    request_class: RequestClass  # SHORT or LONG, fixed at admission
    state: RequestState  # current lifecycle state
    first_scheduled_s: float | None = None  # first StartPrefill/Colocate (queueing delay end)
    prefill_done_s: float | None = None  # last prefill chunk done (first token sampled)
    first_token_s: float | None = None  # first output token produced
    finished_s: float | None = None  # reached a terminal state
    chunks_done: int = 0  # prefill chunks finished (of the current attempt)
    chunks_total: int = 0  # prefill chunks planned (0 before the first StartPrefill)
    num_preemptions: int = 0  # times its prefill was paused for short requests
    num_requeues: int = 0  # times it went back to QUEUED (instance died, retryable failure)
    paused_total_s: float = 0.0  # seconds spent PAUSED so far (completed pauses)
    prefill_instance_ids: tuple[str, ...] = ()  # prefill SP group in rank order (or host)
    decode_instance_ids: tuple[str, ...] = ()  # where it decodes (the group, or one instance)
    output_tokens: int = 0  # tokens generated so far
    error: str = ""  # why it FAILED or was CANCELLED; empty otherwise

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.spec.request_id

    @property
    def instance_ids(self) -> tuple[str, ...]:
        """Instances that ran it: prefill group, then decode instances not already listed."""
        extra = tuple(i for i in self.decode_instance_ids if i not in self.prefill_instance_ids)
        return self.prefill_instance_ids + extra


@dataclass(frozen=True, slots=True)
class AdmissionVerdict:
    """Result of an admission check: `ok`, or why the cluster can never hold the request."""

    ok: bool  # True when the request may be queued
    reason: str = ""  # human-readable cause when not ok, naming the limiting numbers
    field: str = ""  # request field at fault ("prompt_tokens"), empty when ok


@dataclass(frozen=True, slots=True)
class InstanceView:
    """Read-only snapshot of one instance for Watch and metrics."""

    spec: InstanceSpec  # as registered
    role: InstanceRole  # effective role under the running policy
    kv_used_tokens: int  # KV tokens allocated to requests
    prefill_request_id: str | None  # request holding its prefill slot (running or colocated)
    num_decoding: int  # requests decoding here
    request_ids: tuple[str, ...]  # every request with KV here, sorted


@dataclass(frozen=True, slots=True)
class ClassStats:
    """Counts of one request class by state."""

    request_class: RequestClass  # which class
    queued: int  # QUEUED now
    prefilling: int  # PREFILLING now
    paused: int  # PAUSED now
    transferring_kv: int  # TRANSFERRING_KV now
    decoding: int  # DECODING now
    finished_total: int  # FINISHED since the policy started
    queued_tokens: int  # prompt tokens of the QUEUED requests


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Snapshot of queues and instances (pecsched.v1.ClusterSnapshot without the wire)."""

    at_s: float  # when taken, on the driver's clock
    policy: str  # registry name of the running policy
    classes: tuple[ClassStats, ...]  # one per RequestClass, SHORT first
    instances: tuple[InstanceView, ...]  # instances that are up, sorted by id
    preemptions_total: int  # long prefills paused for short ones
    colocations_total: int  # short prefills colocated into long decode
    decode_stalls_total: int  # short prefills run unbudgeted on an instance decoding a long one
    kv_transfers_total: int  # TransferKV actions issued
    cancelled_total: int  # requests cancelled (client, admin or deadline)
    failed_total: int  # requests failed (rejected at admission included)
