"""Actions a policy decides and a driver carries out, bundled in a frozen `Decision`.

The core applies each action to its own bookkeeping when it emits it (the request's state
changes and KV is reserved at once); the driver must carry actions out in order. Every action
has a short `reason` for tracing. Actions are plain frozen data: `repr()` is a stable log line
and `to_dict()` gives JSON-ready fields, so runs of the simulator and the runtime can be diffed.

Data-plane semantics the drivers implement (the simulator's cost model and the agents alike):

- An instance runs at most one prefill at a time (its *prefill slot*) next to any number of
  decodes (continuous batching). A `StartPrefill` on an instance that decodes other requests
  runs the prefill chunks with priority: the decodes there wait while a chunk runs (prefill and
  decode mix, as in engines without a per-iteration prefill budget).
- `Colocate` instead runs the prefill inside the decode iterations of the host, at most
  `iteration_prefill_budget_tokens` prompt tokens per iteration, so the decode it shares the
  instance with keeps a bounded time between tokens.
- Several `Colocate`s with `mixed_batch_tokens` > 0 share their host (the `sarathi` baseline,
  vLLM-v1 / Sarathi-Serve chunked prefill): each iteration runs the host's decodes first, then
  those prefills in start order, each at most `chunk_tokens`, until `mixed_batch_tokens` tokens
  in all (decodes included); no prefill slot is taken. The live agent runs any Colocate as a
  prefill of `min(chunk_tokens, iteration_prefill_budget_tokens)`-token chunks in its engine,
  which mixes prefills and decodes this way; `mixed_batch_tokens` travels with the command
  (`Colocate.mixed_batch_tokens` on the wire) and caps each engine iteration while the prefill
  runs (the engine's own `max_batch_tokens`, which sizes its activation memory, if smaller).
- `Pause` takes effect at the next chunk boundary: the chunk in flight completes (and is
  reported by PrefillChunkDone), the KV stays resident, then the instances' prefill slots are
  free. The core counts the slots as free as soon as it issues the Pause, so a `StartPrefill`
  on those instances may follow in the same Decision: the data plane starts it after the chunk
  in flight. `Resume` continues with the first chunk not yet done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from controlplane.core.types import SpKind


@dataclass(frozen=True, slots=True)
class StartPrefill:
    """Prefill a request on an SP group (one instance when sp_degree == 1)."""

    request_id: str  # which request
    instance_ids: tuple[str, ...]  # SP group in rank order; instance_ids[0] samples token 1
    sp_kind: SpKind  # attention algorithm across the group
    chunk_tokens: int  # prompt tokens per chunk; the prefill may pause at each boundary
    num_chunks: int  # chunks in the whole prompt: ceil(prompt_tokens / chunk_tokens)
    first_chunk_index: int  # chunk to start with (0 for a fresh start)
    decode_in_place: bool  # decode on the group right after prefill (no TransferKV)
    reason: str  # why this group, for tracing

    @property
    def sp_degree(self) -> int:
        """Number of instances in the SP group."""
        return len(self.instance_ids)


@dataclass(frozen=True, slots=True)
class Colocate:
    """Run a prefill inside the iterations of `host_instance_id` (a short beside a long
    decode; with `mixed_batch_tokens`, one of several mixed prefills of any length)."""

    request_id: str  # which request
    host_instance_id: str  # instance running a long request's decode (or mixed batches)
    iteration_prefill_budget_tokens: int  # prompt tokens per decode iteration at most
    chunk_tokens: int  # prompt tokens per chunk (a short prompt is one chunk)
    num_chunks: int  # chunks in the whole prompt
    decode_in_place: bool  # decode on the host after prefill (no TransferKV)
    reason: str  # why this host, for tracing
    mixed_batch_tokens: int = 0  # > 0: tokens per host iteration shared with its decodes and
    # other mixed prefills (sarathi); 0: alone in the host's decode iterations (pecsched)


@dataclass(frozen=True, slots=True)
class Pause:
    """Pause a running prefill at its next chunk boundary; its KV stays resident."""

    request_id: str  # which request
    instance_ids: tuple[str, ...]  # its SP group (where to send the command)
    reason: str  # which request it makes room for


@dataclass(frozen=True, slots=True)
class Resume:
    """Resume a paused prefill on the same SP group from its first chunk not yet done."""

    request_id: str  # which request
    instance_ids: tuple[str, ...]  # its SP group (unchanged since it was paused)
    reason: str  # why now (group free, starvation bound reached)


@dataclass(frozen=True, slots=True)
class TransferKV:
    """Stream a prefilled request's KV from its prefill instance to a decode instance."""

    request_id: str  # which request
    src_instance_id: str  # where the KV is now
    dst_instance_id: str  # where it will decode; KV is reserved there already
    reason: str  # why this destination (e.g. least loaded)


@dataclass(frozen=True, slots=True)
class StartDecode:
    """Start decoding on `instance_id`, which holds the request's whole KV."""

    request_id: str  # which request
    instance_id: str  # the decode instance (destination of a finished TransferKV)
    reason: str  # for tracing


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop every piece of work of the request and drop its KV on `instance_ids`.

    Not only for client cancels: also issued when the request failed (deadline, fatal error)
    or was re-queued (an SP peer died, a retryable failure), to clean up the surviving
    instances. `request_view(request_id).state` says which (CANCELLED, FAILED or QUEUED).
    """

    request_id: str  # which request
    instance_ids: tuple[str, ...]  # instances holding its work or KV (may be empty)
    reason: str  # client cancel, deadline exceeded, ...


@dataclass(frozen=True, slots=True)
class Reject:
    """The request can never be served by this cluster; it is FAILED without running."""

    request_id: str  # which request
    reason: str  # names the limiting numbers (tokens needed vs what the cluster can hold)


Action = StartPrefill | Colocate | Pause | Resume | TransferKV | StartDecode | Cancel | Reject


class ActionKind(StrEnum):
    """Stable names of the action types, for logs and metrics."""

    START_PREFILL = "start_prefill"
    COLOCATE = "colocate"
    PAUSE = "pause"
    RESUME = "resume"
    TRANSFER_KV = "transfer_kv"
    START_DECODE = "start_decode"
    CANCEL = "cancel"
    REJECT = "reject"


_KIND_BY_TYPE: dict[type, ActionKind] = {
    StartPrefill: ActionKind.START_PREFILL,
    Colocate: ActionKind.COLOCATE,
    Pause: ActionKind.PAUSE,
    Resume: ActionKind.RESUME,
    TransferKV: ActionKind.TRANSFER_KV,
    StartDecode: ActionKind.START_DECODE,
    Cancel: ActionKind.CANCEL,
    Reject: ActionKind.REJECT,
}


def action_kind(action: Action) -> ActionKind:
    """Return the stable kind name of `action`."""
    return _KIND_BY_TYPE[type(action)]


def action_to_dict(action: Action) -> dict[str, object]:
    """Return `action` as JSON-ready fields plus `"kind"`; tuples become lists."""
    fields: dict[str, object] = {"kind": action_kind(action).value}
    for key, value in asdict(action).items():
        fields[key] = list(value) if isinstance(value, tuple) else value
    return fields


@dataclass(frozen=True, slots=True)
class Decision:
    """Actions of one `schedule()` call, in the order the driver must carry them out."""

    actions: tuple[Action, ...]  # empty when nothing changed

    @staticmethod
    def make_empty() -> Decision:
        """Return a Decision with no actions."""
        return Decision(actions=())

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to do."""
        return not self.actions

    def to_lines(self) -> list[str]:
        """One stable `repr` line per action, for logs and line-by-line diffs."""
        return [repr(a) for a in self.actions]
