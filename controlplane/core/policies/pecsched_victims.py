"""PecSched's preemption: when a queued short may pause a running long prefill, and which one.

`ShortPreemption` owns the long prefills' chunk clocks (when the chunk in flight started, how
long the last one ran) and decides, for one short request:
- `wake_s`: when the head of the short queue will have waited `short_preempt_delay_s` (the
  policy's timer);
- `deadline_s`: the latest end of a victim's chunk in flight at which the short may pause it
  now (inf: any victim; None: not now);
- `preempt_for`: among the first `_MAX_VICTIMS_TRIED` running long prefills in the pause order
  of `ClusterState.pop_victim` (smallest SP group, least paused so far, newest; never one on
  its last chunk or colocated on a short-decode instance, never one whose duty cycle forbids
  it), the one with an instance that has room for the short and whose chunk in flight should
  end first by that deadline: it is paused (protected once `max_preemptions_per_long` is
  reached) and the short starts on that instance.
It changes `ClusterState` only through its methods (pause, protect, start_prefill and the
victim heap, whose entries not taken are pushed back).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from controlplane.core.actions import Action
from controlplane.core.config import SchedulerConfig
from controlplane.core.events import (
    Event,
    KVTransferDone,
    PrefillChunkDone,
    PrefillDone,
    RequestCancelled,
    RequestFailed,
    RequestFinished,
)
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.state import ClusterState, VictimEntry
from controlplane.core.types import InstanceRole, RequestClass, RequestState

# running long prefills examined per preemption attempt (8 -> 32: short p99 queueing on the
# long20-bursty and Azure Mistral-7B points of bench/paper_eval.py -35 to -50%, every seed)
_MAX_VICTIMS_TRIED = 32
_DECODE = InstanceRole.SHORT_DECODE


class _ChunkMark(NamedTuple):
    """A long prefill's chunk clock."""

    started_s: float  # when its chunk in flight started
    last_s: float  # how long its last chunk ran, start to end (NaN until one did)


class ShortPreemption:
    """Pauses the running long prefill nearest a chunk boundary for a waiting short."""

    def __init__(self, config: SchedulerConfig, state: ClusterState) -> None:
        self._config = config
        self._state = state
        # long prefills' chunk clocks, to pause the one nearest a chunk boundary
        self._chunk_marks: dict[str, _ChunkMark] = {}

    def observe(self, event: Event) -> float:
        """Keep the chunk clocks: a chunk's end starts the next; a prefill that ended, was
        cancelled or failed is forgotten. Returns how long the chunk a PrefillChunkDone ends
        ran (NaN: unknown, or another event)."""
        last_s = math.nan
        if isinstance(event, PrefillChunkDone):
            mark = self._chunk_marks.get(event.request_id)
            last_s = math.nan if mark is None else event.at_s - mark.started_s
            self._chunk_marks[event.request_id] = _ChunkMark(event.at_s, last_s)
        elif isinstance(
            event,
            RequestCancelled | RequestFailed | KVTransferDone | PrefillDone | RequestFinished,
        ):
            self._chunk_marks.pop(event.request_id, None)
        return last_s

    def resumed(self, request_id: str, now_s: float) -> None:
        """A paused long prefill resumed at `now_s`: its chunk in flight starts then."""
        mark = self._chunk_marks.get(request_id)
        if mark is not None:
            self._chunk_marks[request_id] = _ChunkMark(now_s, mark.last_s)

    def wake_s(self, head: RequestRecord | None, now_s: float) -> float:
        """When `head`, the head of the short queue, may preempt once its delay is over, if
        later than `now_s` (else inf)."""
        if head is None or not self._config.preemption:
            return math.inf
        preempt_s = self._delay_ends_s(head)
        return preempt_s if preempt_s > now_s else math.inf

    def _delay_ends_s(self, req: RequestRecord) -> float:
        """When short `req` has waited `short_preempt_delay_s`."""
        return req.spec.arrival_s + self._config.short_preempt_delay_s

    def deadline_s(self, req: RequestRecord, now_s: float) -> float | None:
        """Latest end of a victim's chunk in flight at which `req` may pause it now (inf: any
        victim; None: no preemption). With `preemption`: any once `req` has waited
        `short_preempt_delay_s` (a decoder's colocated prefill or an open instance may free up
        first). Before that, with `short_preempt_early`: any when more shorts are queued than
        short prefills are running (each of those frees an instance soon, so waiting could
        place only some: a burst); else one whose chunk ends before the delay would (waiting
        would only miss that boundary)."""
        cfg = self._config
        if not cfg.preemption:
            return None
        delay_ends_s = self._delay_ends_s(req)
        if now_s >= delay_ends_s:
            return math.inf
        if not cfg.short_preempt_early:
            return None
        counts = self._state.counts
        short = RequestClass.SHORT
        if counts[(short, RequestState.QUEUED)] > counts[(short, RequestState.PREFILLING)]:
            return math.inf
        return delay_ends_s

    def preempt_for(
        self, req: RequestRecord, now_s: float, out: list[Action], in_place: bool, ends_by_s: float
    ) -> bool:
        """Pause a running long prefill whose chunk in flight should end by `ends_by_s` and
        start `req` on one of its instances (decoding there when `in_place`); False when no
        victim qualifies."""
        st = self._state
        need = req.spec.total_tokens if in_place else req.spec.prompt_tokens
        found = self._find_victim(req, need, now_s, ends_by_s)
        if found is None:
            return False
        victim, host = found
        out.append(st.pause(victim, now_s, f"make room for short request {req.request_id}"))
        bound = self._config.max_preemptions_per_long
        if bound is not None and victim.num_preemptions >= bound:
            st.protect(victim)  # anti-thrash: only the protected duty cycle pauses it again
        reason = f"preempted long request {victim.request_id} on {host.instance_id}"
        out.append(
            st.start_prefill(req, [host], decode_in_place=in_place, now_s=now_s, reason=reason)
        )
        return True

    def _find_victim(
        self, req: RequestRecord, need_tokens: int, now_s: float, ends_by_s: float
    ) -> tuple[RequestRecord, InstanceRecord] | None:
        """Among the first `_MAX_VICTIMS_TRIED` running long prefills in pause order
        (smallest SP group, least paused, newest first) that may be paused and have an
        instance with room for `req`, the one whose chunk in flight should end first (none
        whose chunk should end after `ends_by_s`)."""
        st = self._state
        kept: list[VictimEntry] = []
        found: tuple[float, int, RequestRecord, InstanceRecord] | None = None
        while len(kept) < _MAX_VICTIMS_TRIED and (popped := st.pop_victim()) is not None:
            entry, victim = popped
            if (
                victim.chunks_done + 1 >= victim.chunks_total  # last chunk in flight
                or st.instances[victim.prefill_ids[0]].role is _DECODE  # colocated on a decoder
            ):
                continue  # never a victim again
            kept.append(entry)
            if not st.pause_due(victim):
                continue  # not before its duty cycle's chunks ran
            hosts = [
                st.instances[i]
                for i in victim.prefill_ids
                if not (req.refusals and st.refused(req, i, now_s))
            ]
            host = max(
                hosts,
                key=lambda inst: (st.ledger.free_tokens(inst.instance_id), inst.instance_id),
                default=None,
            )
            if host is None or not st.ledger.can_allocate(host.instance_id, need_tokens):
                continue
            boundary = (self._chunk_end_s(victim), len(kept), victim, host)
            if boundary[0] <= ends_by_s and (found is None or boundary[:2] < found[:2]):
                found = boundary
        for entry in kept:
            if found is None or entry.request_id != found[2].request_id:
                st.push_victim(entry)
        return None if found is None else (found[2], found[3])

    def _chunk_end_s(self, req: RequestRecord) -> float:
        """When `req`'s chunk in flight should end, from its last chunk's length (inf when
        no chunk ran start to end since it started)."""
        mark = self._chunk_marks.get(req.request_id)
        if mark is None or math.isnan(mark.last_s):
            return math.inf
        return mark.started_s + mark.last_s
