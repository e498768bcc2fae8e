"""`RuntimeState`: what the tick thread knows beyond the policy, per request and per node.

Owned by the tick thread (controlplane/runtime/ticker.py); the event loop reads only the
`TokenLog` objects it is handed. Everything here is rebuilt from the database at start-up
(controlplane/runtime/recovery.py), except trace contexts, which live only in memory.
"""

from __future__ import annotations

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
    costs about 36 bytes a token)."""
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


class RuntimeState:
    """Per-request and per-node bookkeeping of the runtime (tick thread only)."""

    def __init__(self) -> None:
        self.logs: dict[str, TokenLog] = {}  # unfinished request -> its output
        self.inputs: dict[str, RequestInputs] = {}  # unfinished request -> its inputs
        self.carry: dict[str, Carryover] = {}  # recovered request -> earlier counters
        self.traces: dict[str, TraceContext] = {}  # request -> its submit span's context
        self.state_of: dict[str, RequestState] = {}  # request -> last persisted state
        self.requeues_of: dict[str, int] = {}  # request -> last persisted num_requeues
        self.placement: dict[str, frozenset[str]] = {}  # request -> instances of its work
        self.gen_base: dict[str, int] = {}  # request -> tokens known at its last StartPrefill
        self.attempts: Counter[str] = Counter()  # request -> prefills/transfers started
        self.transfers: dict[str, TransferInfo] = {}  # transfer id -> transfer in flight
        self.last_transfer: dict[str, str] = {}  # request -> id of its finished transfer
        self.tenant_active: Counter[str] = Counter()  # tenant -> unfinished requests
        self.tenant_prompt_bytes: Counter[str] = Counter()  # tenant -> bytes of held prompts
        self.instance_node: dict[str, str] = {}  # instance up -> its node
        self.rendezvous: dict[str, str] = {}  # node -> its rendezvous store address

    def track(self, request_id: str, inputs: RequestInputs, log: TokenLog) -> None:
        """Start tracking an unfinished request."""
        self.logs[request_id] = log
        self.inputs[request_id] = inputs
        self.state_of[request_id] = RequestState.QUEUED
        self.requeues_of[request_id] = 0
        self.tenant_active[inputs.tenant] += 1
        self.tenant_prompt_bytes[inputs.tenant] += inputs.prompt_bytes

    def settle(self, view: RequestView) -> None:
        """Record a persisted view; forget the request once it is terminal.

        A request that is no longer TRANSFERRING_KV (re-queued, or decoding where it was
        prefilled after its destination was lost) has no transfer in flight any more: a late
        report or the expiry of an earlier transfer must not reach the policy.
        """
        rid = view.request_id
        if not view.state.is_terminal:
            self.state_of[rid] = view.state
            self.requeues_of[rid] = view.num_requeues
            self.placement[rid] = frozenset(view.instance_ids)
            if view.state is not RequestState.TRANSFERRING_KV:
                self.forget_transfers(lambda info: info.request_id == rid)
            return
        inputs = self.inputs.pop(rid, None)
        if inputs is not None:
            self.tenant_active[inputs.tenant] -= 1
            self.tenant_prompt_bytes[inputs.tenant] -= inputs.prompt_bytes
            if self.tenant_active[inputs.tenant] <= 0:
                del self.tenant_active[inputs.tenant]
                del self.tenant_prompt_bytes[inputs.tenant]
        self.logs.pop(rid, None)
        self.carry.pop(rid, None)
        self.traces.pop(rid, None)
        self.state_of.pop(rid, None)
        self.requeues_of.pop(rid, None)
        self.placement.pop(rid, None)
        self.gen_base.pop(rid, None)
        self.attempts.pop(rid, None)
        self.last_transfer.pop(rid, None)
        self.forget_transfers(lambda info: info.request_id == rid)

    def forget_transfers(self, which: Callable[[TransferInfo], bool]) -> None:
        """Stop tracking the transfers in flight that `which` selects (reports about them
        are dropped as stale from now on, and they never expire)."""
        for transfer_id in [t for t, info in self.transfers.items() if which(info)]:
            del self.transfers[transfer_id]

    def with_carryover(self, view: RequestView) -> RequestView:
        """`view` with earlier counters added and the output count of the token log."""
        carry = self.carry.get(view.request_id)
        log = self.logs.get(view.request_id)
        output_tokens = len(log.ids) if log is not None else view.output_tokens
        if carry is None:
            return replace(view, output_tokens=output_tokens)
        return replace(
            view,
            num_preemptions=view.num_preemptions + carry.num_preemptions,
            num_requeues=view.num_requeues + carry.num_requeues,
            paused_total_s=view.paused_total_s + carry.paused_total_s,
            output_tokens=output_tokens,
        )
