"""`RuntimeState`: what the tick thread knows beyond the policy, per request and per node.

Owned by the tick thread (controlplane/runtime/ticker.py); the event loop reads only the
`TokenLog` objects it is handed. Everything here is rebuilt from the database at start-up
(controlplane/runtime/recovery.py), except trace contexts, which live only in memory.
"""

from __future__ import annotations

import secrets
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from controlplane.core.types import RequestState, RequestView
from controlplane.runtime.tokens import TokenLog
from controlplane.store.records import SamplingParams
from controlplane.telemetry import TraceContext


def packed_ids(token_ids: Sequence[int]) -> array[int]:
    """Token ids packed 4 bytes each: how the runtime holds prompts (a tuple of Python ints
    costs about 36 bytes a token). Ids already packed so are returned as they are, not
    copied: a queued prompt is held once."""
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return token_ids
    return array("I", token_ids)


@dataclass(frozen=True, slots=True)
class RequestInputs:
    """What the data plane needs to (re)run a request."""

    tenant: str
    prompt_token_ids: array[int]  # packed uint32 (see `packed_ids`)
    max_new_tokens: int
    sampling: SamplingParams

    @property
    def prompt_bytes(self) -> int:
        """Memory the prompt takes here."""
        return len(self.prompt_token_ids) * self.prompt_token_ids.itemsize


@dataclass(frozen=True, slots=True)
class Carryover:
    """Counters a request had before this process started (added to the policy's own)."""

    num_preemptions: int = 0
    num_requeues: int = 0
    paused_total_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """A KV transfer in flight."""

    request_id: str
    source_instance_id: str
    destination_instance_id: str
    expires_s: float  # no DONE/FAILED by then (1.5 x timeout + grace): the runtime fails it


@dataclass(slots=True)
class Tracked:
    """What the runtime knows of one unfinished request beyond the policy (tick thread)."""

    inputs: RequestInputs
    log: TokenLog  # its output
    state: RequestState = RequestState.QUEUED  # as last persisted
    num_requeues: int = 0  # as last persisted
    placement: frozenset[str] = frozenset()  # instances of its current work
    gen_base: int | None = None  # output tokens known at its last StartPrefill
    attempts: int = 0  # prefills and transfers started (numbers their group ids)
    last_transfer: str = ""  # id of its finished KV transfer ("" before one)
    carry: Carryover | None = None  # counters from before this process (recovered requests)
    trace: TraceContext | None = None  # its submit span's context


class RuntimeState:
    """Per-request and per-node bookkeeping of the runtime (tick thread only)."""

    def __init__(self) -> None:
        # Part of every group and transfer id: attempts restart at 0 with the process, and a
        # worker refuses a group id it has already destroyed, so ids must differ per process.
        self.epoch = secrets.token_hex(4)
        self.requests: dict[str, Tracked] = {}  # unfinished request -> its record
        self.transfers: dict[str, TransferInfo] = {}  # transfer id -> transfer in flight
        self.tenant_active: Counter[str] = Counter()  # tenant -> unfinished requests
        self.tenant_prompt_bytes: Counter[str] = Counter()  # tenant -> bytes of held prompts
        self.instance_node: dict[str, str] = {}  # instance up -> its node
        self.rendezvous: dict[str, str] = {}  # node -> its rendezvous store address

    def track(self, request_id: str, record: Tracked) -> None:
        """Start tracking an unfinished request."""
        self.requests[request_id] = record
        tenant = record.inputs.tenant
        self.tenant_active[tenant] += 1
        self.tenant_prompt_bytes[tenant] += record.inputs.prompt_bytes

    def settle(self, view: RequestView) -> None:
        """Record a persisted view; forget the request once it is terminal.

        A request that is no longer TRANSFERRING_KV (re-queued, or decoding where it was
        prefilled after its destination was lost) has no transfer in flight any more: a late
        report or the expiry of an earlier transfer must not reach the policy.
        """
        rid = view.request_id
        if not view.state.is_terminal:
            record = self.requests.get(rid)
            if record is not None:
                record.state = view.state
                record.num_requeues = view.num_requeues
                record.placement = frozenset(view.instance_ids)
            if view.state is not RequestState.TRANSFERRING_KV:
                self.forget_transfers(lambda info: info.request_id == rid)
            return
        record = self.requests.pop(rid, None)
        if record is not None:
            tenant = record.inputs.tenant
            self.tenant_active[tenant] -= 1
            self.tenant_prompt_bytes[tenant] -= record.inputs.prompt_bytes
            if self.tenant_active[tenant] <= 0:
                del self.tenant_active[tenant]
                del self.tenant_prompt_bytes[tenant]
        self.forget_transfers(lambda info: info.request_id == rid)

    def forget_transfers(self, which: Callable[[TransferInfo], bool]) -> None:
        """Stop tracking the transfers in flight that `which` selects (reports about them
        are dropped as stale from now on, and they never expire)."""
        for transfer_id in [t for t, info in self.transfers.items() if which(info)]:
            del self.transfers[transfer_id]

    def with_carryover(self, view: RequestView) -> RequestView:
        """`view` with earlier counters added and the output count of the token log."""
        record = self.requests.get(view.request_id)
        if record is None:
            return view
        output_tokens = len(record.log.ids)
        carry = record.carry
        if carry is None:
            return replace(view, output_tokens=output_tokens)
        return replace(
            view,
            num_preemptions=view.num_preemptions + carry.num_preemptions,
            num_requeues=view.num_requeues + carry.num_requeues,
            paused_total_s=view.paused_total_s + carry.paused_total_s,
            output_tokens=output_tokens,
        )
