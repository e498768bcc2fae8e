"""`Preemption`: which running long prefills may be paused, and when a paused one must resume.

Two heaps with named, possibly stale entries: `running_longs` (pause candidates, best victim
first) and `pause_deadlines` (starvation bounds of paused requests, earliest first). An entry
is stale once its request left the state it was pushed in, or was paused again since
(`num_preemptions` moved on); stale entries are dropped when popped. The rules of when a
request may be paused (`preemptible`, `pause_due`) live here too.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

from controlplane.core.config import SchedulerConfig
from controlplane.core.records import RequestRecord
from controlplane.core.types import RequestState

_S = RequestState


class VictimEntry(NamedTuple):
    """A running long prefill that may be paused; `running_longs` orders them best victim
    first: fewest instances idled by the pause, least paused so far, newest."""

    sp_degree: int  # instances of its prefill group
    paused_total_s: float  # paused so far when pushed
    neg_seq: int  # -admission seq: newest first
    request_id: str
    preemptions: int  # its pause count when pushed; a later pause makes the entry stale


class PauseDeadline(NamedTuple):
    """When a paused request reaches the starvation bound (`pause_deadlines`, earliest first)."""

    at_s: float
    seq: int  # admission seq: ties in admission order
    request_id: str
    preemptions: int  # its pause count when paused; a later pause makes the entry stale


class Preemption:
    """Pause candidates and starvation bounds over the requests of one `ClusterState`.

    `requests` is the state's own map (shared, not copied): entries are checked against it.
    """

    def __init__(self, config: SchedulerConfig, requests: dict[str, RequestRecord]) -> None:
        self._config = config
        self._requests = requests
        self.running_longs: list[VictimEntry] = []  # preemption candidates, best first
        self.pause_deadlines: list[PauseDeadline] = []  # starvation bounds of paused requests

    def preemptible(self, req: RequestRecord) -> bool:
        """Whether `req` may ever be paused again (unprotected, or on the duty cycle)."""
        return not req.is_protected or self._config.protected_duty_cycle_chunks is not None

    def chunks_before_pause(self, req: RequestRecord) -> int:
        """Chunks `req` must run after it (re)started before it may be paused: the duty cycle
        when protected, else `min_chunks_between_pauses` (call only when `preemptible`)."""
        if req.is_protected:
            return self._config.protected_duty_cycle_chunks or 0
        return self._config.min_chunks_between_pauses

    def pause_due(self, req: RequestRecord) -> bool:
        """A preemptible `req` has run enough chunks since it last (re)started to be paused."""
        return req.chunks_done - req.resumed_at_chunk >= self.chunks_before_pause(req)

    def push_running(self, req: RequestRecord) -> None:
        """`req` (a long prefill) started or resumed: a pause candidate (when preemption is on)."""
        if not self._config.preemption:
            return
        entry = VictimEntry(
            len(req.prefill_ids),
            req.paused_total_s,
            -req.seq,
            req.request_id,
            req.num_preemptions,
        )
        heapq.heappush(self.running_longs, entry)

    def pop_victim(self) -> tuple[VictimEntry, RequestRecord] | None:
        """The best running long prefill that may be paused (still PREFILLING, not paused
        since it was pushed, preemptible), removed from `running_longs`; stale entries popped
        on the way are dropped. None when there is none. Give back the ones not paused with
        `push_victim`."""
        heap = self.running_longs
        while heap:
            entry = heapq.heappop(heap)
            req = self._requests.get(entry.request_id)
            if (
                req is not None
                and req.state is _S.PREFILLING
                and req.num_preemptions == entry.preemptions
                and self.preemptible(req)
            ):
                return entry, req
        return None

    def push_victim(self, entry: VictimEntry) -> None:
        """Put back an entry `pop_victim` returned (its request was not paused)."""
        heapq.heappush(self.running_longs, entry)

    def add_pause_deadline(self, req: RequestRecord, now_s: float) -> None:
        """`req` was just paused at `now_s`: its starvation bound falls when its pauses add up
        to `max_pause_s`."""
        left_s = max(0.0, self._config.max_pause_s - req.paused_total_s)
        entry = PauseDeadline(now_s + left_s, req.seq, req.request_id, req.num_preemptions)
        heapq.heappush(self.pause_deadlines, entry)

    def pop_starving(self, now_s: float) -> list[RequestRecord]:
        """Paused requests whose starvation bound (`max_pause_s` of pauses) is at or before
        `now_s` and that were not resumed and paused again since, earliest first (removed)."""
        heap, out = self.pause_deadlines, []
        while heap and heap[0].at_s <= now_s:
            entry = heapq.heappop(heap)
            req = self._requests.get(entry.request_id)
            if (
                req is not None
                and req.state is _S.PAUSED
                and req.num_preemptions == entry.preemptions
            ):
                out.append(req)
        return out

    def next_starvation_s(self) -> float:
        """When the earliest pending starvation bound falls (inf: none; may be stale)."""
        return self.pause_deadlines[0].at_s if self.pause_deadlines else math.inf
