"""Mutable bookkeeping records of the core (private to the policies; views leave as values)."""

from __future__ import annotations

from enum import IntEnum

from controlplane.core.types import (
    InstanceRole,
    InstanceSpec,
    InstanceView,
    RequestClass,
    RequestSpec,
    RequestState,
    RequestView,
)


class Slot(IntEnum):
    """Which pool an instance is offered in (see pool.InstancePool)."""

    OPEN = 0  # prefill slot free, no long work resident (SHORT_DECODE: room for decodes)
    LONG_DECODE = 1  # prefill slot free, decoding a long request (colocation candidate)
    PAUSED_HOST = 2  # prefill slot free, a preemptible paused long prefill resident
    BUSY = 3  # offered nowhere: slot taken, decode batch full, or held for a resume


class RequestRecord:
    """Everything the core tracks about one request."""

    __slots__ = (
        "chunks_done",
        "chunks_total",
        "decode_ids",
        "decode_in_place",
        "error",
        "failures_in_row",
        "finished_s",
        "fits_census_version",
        "first_scheduled_s",
        "held_ids",
        "first_token_s",
        "is_protected",
        "num_preemptions",
        "num_requeues",
        "output_tokens",
        "paused_since_s",
        "paused_total_s",
        "prefill_done_s",
        "prefill_ids",
        "refusals",
        "request_class",
        "request_id",
        "resumed_at_chunk",
        "seq",
        "spec",
        "state",
        "transfer_attempts",
        "transfer_dst",
    )

    def __init__(self, spec: RequestSpec, request_class: RequestClass, seq: int) -> None:
        self.spec = spec
        self.request_id = spec.request_id  # copied: read on every hot path
        self.request_class = request_class
        self.seq = seq  # admission order; ties in every queue are broken by it
        self.state = RequestState.QUEUED
        self.first_scheduled_s: float | None = None
        self.prefill_done_s: float | None = None
        self.first_token_s: float | None = None
        self.finished_s: float | None = None
        self.chunks_done = 0
        self.chunks_total = 0
        self.num_preemptions = 0
        self.num_requeues = 0
        self.paused_total_s = 0.0
        self.paused_since_s: float | None = None
        self.is_protected = False  # starvation bound reached: paused only on the duty cycle
        self.resumed_at_chunk = 0  # chunks_done when its prefill last started or resumed
        self.prefill_ids: tuple[str, ...] = ()
        self.decode_ids: tuple[str, ...] = ()
        self.decode_in_place = False
        self.held_ids: tuple[str, ...] = ()  # instances held for it (an aged queued long)
        self.transfer_dst: str | None = None  # destination of the transfer in flight
        self.transfer_attempts = 0
        self.output_tokens = 0
        self.error = ""
        self.fits_census_version = -1  # census version at which it was last found to fit
        # instances that refused it (retryable failure): id -> (their free KV then, until when)
        self.refusals: dict[str, tuple[int, float]] = {}
        self.failures_in_row = 0  # retryable failures since it last generated a token

    def to_view(self) -> RequestView:
        """Immutable snapshot."""
        return RequestView(
            spec=self.spec,
            request_class=self.request_class,
            state=self.state,
            first_scheduled_s=self.first_scheduled_s,
            prefill_done_s=self.prefill_done_s,
            first_token_s=self.first_token_s,
            finished_s=self.finished_s,
            chunks_done=self.chunks_done,
            chunks_total=self.chunks_total,
            num_preemptions=self.num_preemptions,
            num_requeues=self.num_requeues,
            paused_total_s=self.paused_total_s,
            prefill_instance_ids=self.prefill_ids,
            decode_instance_ids=self.decode_ids,
            output_tokens=self.output_tokens,
            error=self.error,
        )


class InstanceRecord:
    """Everything the core tracks about one instance that is up."""

    __slots__ = (
        "decoding",
        "held_for",
        "instance_id",
        "num_long_decoding",
        "offered_free",
        "paused",
        "prefill_id",
        "role",
        "slot",
        "spec",
        "tiebreak",
        "version",
    )

    def __init__(self, spec: InstanceSpec, role: InstanceRole, tiebreak: float) -> None:
        self.spec = spec
        self.instance_id = spec.instance_id  # copied: read on every hot path
        self.role = role  # effective role under the running policy
        self.tiebreak = tiebreak  # seeded random key spreading load over equal instances
        self.prefill_id: str | None = None  # request holding the prefill slot
        self.decoding: set[str] = set()  # requests decoding here (long group members included)
        self.num_long_decoding = 0  # long requests among `decoding`
        self.paused: set[str] = set()  # paused long prefills with KV here
        self.held_for: str | None = None  # request it is held for (resume or aged start)
        self.slot = Slot.BUSY  # pool it is offered in (kept by InstancePool)
        self.offered_free = 0  # free KV tokens in its current heap entry (kept by InstancePool)
        self.version = 0  # set by the pool on every refresh; stale heap entries are skipped

    def to_view(self, kv_used_tokens: int, request_ids: tuple[str, ...]) -> InstanceView:
        """Immutable snapshot (KV numbers come from the ledger)."""
        return InstanceView(
            spec=self.spec,
            role=self.role,
            kv_used_tokens=kv_used_tokens,
            prefill_request_id=self.prefill_id,
            num_decoding=len(self.decoding),
            request_ids=request_ids,
        )
