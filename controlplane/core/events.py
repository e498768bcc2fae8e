"""Events a driver (runtime/ or sim/) feeds to `Policy.observe`.

Every event carries `at_s`, when it happened on the driver's clock. Events about a request that
is already terminal, or that the policy no longer tracks, are ignored (they are normal races:
a chunk finishing while its request is cancelled). Events that contradict the lifecycle of a
live request raise `IllegalTransitionError`: they mean the driver is broken.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.core.types import InstanceSpec, RequestSpec


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A request was accepted (or recovered after a control-plane restart); it gets queued."""

    spec: RequestSpec  # the request; its id must be new to the policy
    at_s: float  # when it was accepted (usually spec.arrival_s)


@dataclass(frozen=True, slots=True)
class PrefillChunkDone:
    """Prefill chunk `chunk_index` (0-based) of the request finished on its whole SP group.

    Reported once per chunk, by the group's rank 0. A chunk in flight when a Pause was issued
    still completes and is reported here while the request is PAUSED.
    """

    request_id: str  # whose chunk
    chunk_index: int  # 0-based index of the chunk that finished
    at_s: float  # when it finished


@dataclass(frozen=True, slots=True)
class PrefillPaused:
    """The data plane stopped the request's prefill at a chunk boundary (acknowledges Pause).

    Informational: the core already treats a Pause as effective when it issues it (see
    `actions.Pause`); this event only reconciles `chunks_done`.
    """

    request_id: str  # whose prefill
    chunks_done: int  # chunks finished so far; a Resume continues with chunk `chunks_done`
    at_s: float  # when it stopped


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The request's last prefill chunk finished and its first token was sampled.

    Implies every chunk is done (a driver need not report the last PrefillChunkDone).
    """

    request_id: str  # whose prefill
    at_s: float  # when it finished


@dataclass(frozen=True, slots=True)
class KVTransferDone:
    """A TransferKV ended: `ok` means the destination holds the whole KV; else it failed."""

    request_id: str  # whose KV
    dst_instance_id: str  # destination of the transfer
    ok: bool  # True on success; False frees the destination and retries elsewhere
    at_s: float  # when it ended
    error: str = ""  # why it failed, empty on success


@dataclass(frozen=True, slots=True)
class TokensGenerated:
    """`num_tokens` more output tokens were generated (the first one included)."""

    request_id: str  # whose tokens
    num_tokens: int  # tokens generated since the previous report, >= 1
    at_s: float  # when the last of them was generated


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """The request stopped at max_new_tokens or EOS; its KV is freed everywhere."""

    request_id: str  # which request
    at_s: float  # when it finished


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """A client or admin cancelled the request; the policy frees it and issues a Cancel."""

    request_id: str  # which request
    at_s: float  # when the cancel was accepted
    reason: str = "cancelled by client"  # recorded as the request's error text


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The data plane failed the request's work; retryable failures re-queue it."""

    request_id: str  # which request
    retryable: bool  # True: free everything and queue it again; False: FAILED
    at_s: float  # when it failed
    error: str = ""  # why


@dataclass(frozen=True, slots=True)
class InstanceUp:
    """An instance registered (or came back); the policy may assign it a role."""

    spec: InstanceSpec  # the instance; its id must not be up already
    at_s: float  # when it registered


@dataclass(frozen=True, slots=True)
class InstanceDown:
    """An instance died or left: every unfinished request with work or KV on it is re-queued.

    A request whose SP group (or KV transfer source) included the instance loses all its KV and
    starts over; a transfer whose destination died is retried elsewhere.
    """

    instance_id: str  # which instance
    at_s: float  # when it was declared down
    reason: str = "instance down"  # recorded in the actions' reasons


Event = (
    RequestArrived
    | PrefillChunkDone
    | PrefillPaused
    | PrefillDone
    | KVTransferDone
    | TokensGenerated
    | RequestFinished
    | RequestCancelled
    | RequestFailed
    | InstanceUp
    | InstanceDown
)
