"""`sarathi`: vLLM-v1 / Sarathi-Serve chunked-prefill mixing behind a load-balancing router.

Every instance runs mixed batches (`actions.Colocate` with `mixed_batch_tokens`): each iteration
takes its decodes first, then its prefills in flight in admission order, each at most its chunk,
until `sarathi_batch_tokens` tokens in all (vLLM `max_num_batched_tokens`). A prompt longer than
`sarathi_long_prefill_tokens` gets at most that many tokens per iteration (vLLM V1's use of
`long_prefill_token_threshold`); shorter ones take what the budget leaves. An instance has at
most `sarathi_max_partial_prefills` prefills in flight (`max_num_partial_prefills`), at most
`sarathi_max_long_partial_prefills` of them LONG (`max_long_partial_prefills`). vLLM V0 counts
every prompt above `long_prefill_token_threshold` as long there; here the LONG class does (the
threshold every policy uses), so a 1-4K prompt never waits for a long place (in sarathi's
favour). Nothing is preempted; every request decodes where it prefilled (no disaggregation).

Routing (the cluster router in front of the engines): requests leave one queue first come first
served; each goes to the instance with the fewest outstanding prefill tokens (prompt tokens of its
prefills in flight), then the fewest decodes, that has a free prefill place of its kind, KV room for
prompt + output and a sequence place: its decodes plus prefills in flight stay below
`max_decode_batch` (vLLM `max_num_seqs` counts both; the engine's `max_batch_seqs` bounds the
sequences of one iteration, so every sequence then runs in each iteration, as the simulator prices
it). The instances sit in a heap by that key, corrected lazily: an entry whose instance's key has
grown is pushed back with the new key when popped, and an instance whose key may have shrunk (a
prefill settled, a request ended on it) gets a fresh entry, so a request costs O(log n) per instance
looked at, not a scan of every instance. The router binds a request only once an instance can take
it (late binding, a little better than a router that queues at the engines). A long prompt waiting
for a long place does not hold back the shorter prompts behind it; a request that finds no place
otherwise stops the queue.

A prompt whose KV no single instance holds runs as `fifo` runs it: a chunked SP prefill over the
fewest instances that hold it, then decodes there. Its instances are gathered one by one as their
mixed prefills drain (held meanwhile, so a stream of short prompts cannot starve it); only ones
that leave a group within `max_sp_degree` able to hold it are held.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy, rank_order
from controlplane.core.config import SchedulerConfig
from controlplane.core.events import (
    Event,
    InstanceDown,
    InstanceUp,
    PrefillDone,
    RequestCancelled,
    RequestFailed,
    RequestFinished,
)
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.roles import all_general
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, RequestState


class _RouteKey(NamedTuple):
    """An instance's place in the router's heap: least prompt tokens of partial prefills
    first, then fewest decodes, then the seeded tiebreak."""

    prompt_tokens: int  # of the partial prefills admitted to it
    num_decoding: int
    tiebreak: float
    instance_id: str


class SarathiPolicy(BasePolicy):
    """Mixed prefill/decode batches on every instance, routed by outstanding prefill tokens."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, all_general)
        self._flights: dict[str, _Flight] = {}  # request id -> its mixed prefill in flight
        self._load: dict[str, _Load] = {}  # instance id -> its mixed prefills in flight
        self._full = [0, 0]  # instances with no free place for a short, for a long prompt
        self._num_settled = 0  # mixed prefills ended (each frees a place)
        self._num_failed = 0  # stats["failed"] when the flights were last checked
        self._blocked: tuple[str, int, int, int, int] | None = None  # _route_key() of a miss
        # router heap: each instance's key when pushed (stale entries are skipped)
        self._heap: list[_RouteKey] = []
        self._shrunk: set[str] = set()  # instances whose key may be below their heap entries'
        self._rebuild = True  # instances came or went: rebuild the heap from scratch
        self._sp_holder: str | None = None  # the request the SP holds were last taken for

    def observe(self, events: Sequence[Event]) -> None:
        """Apply events (see BasePolicy); free the places of mixed prefills that ended; note
        the instances whose router key may have shrunk."""
        st = self._state
        for event in events:
            if isinstance(event, RequestFinished | RequestCancelled | RequestFailed):
                req = st.requests.get(event.request_id)
                if req is not None:  # it decodes where it prefilled
                    self._shrunk.update(req.prefill_ids)
        super().observe(events)
        for event in events:
            match event:
                case PrefillDone() | RequestCancelled() | RequestFailed():
                    self._settle(event.request_id)
                case InstanceDown():
                    self._rebuild = True
                    for request_id in list(self._flights):
                        self._settle(request_id)
                case InstanceUp():
                    self._rebuild = True

    def _plan(self, now_s: float, out: list[Action]) -> None:
        num_failed = self._state.stats["failed"]
        if num_failed != self._num_failed:  # deadline cancels happen in schedule(), not observe
            self._num_failed = num_failed
            self._rebuild = True
            for request_id in list(self._flights):
                self._settle(request_id)
        longs_open = True  # False once the oldest long found no place: shorts may pass it
        while True:
            short = self._head(RequestClass.SHORT)
            long = self._head(RequestClass.LONG) if longs_open else None
            if long is not None and (short is None or _key(long) < _key(short)):
                req = long
            elif short is not None:
                req = short
            else:
                return
            self._yield_holds_to(req)
            if self._place(req, now_s, out) or self._reject_if_never_fits(req, out):
                continue
            if req is short:
                return
            longs_open = False

    def _yield_holds_to(self, req: RequestRecord) -> None:
        """Release the SP holds of a queued request that `req` goes before (a higher priority
        arrived): holds must never keep a request with precedence waiting (a deadlock when it
        needs the held instances, or when it is an SP long holding the rest of them)."""
        holder = self._state.requests.get(self._sp_holder) if self._sp_holder else None
        if (
            holder is not None
            and holder is not req
            and holder.state is RequestState.QUEUED
            and _key(req) < _key(holder)
        ):
            self._state.release_holds(holder)
            self._sp_holder = None

    def _place(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        cfg, st = self._config, self._state
        capacities = st.census.capacities(InstanceRole.GENERAL)
        if capacities and req.spec.total_tokens > capacities[-1]:
            return self._place_sp(req, now_s, out)
        is_long = req.request_class is RequestClass.LONG
        key = self._route_key(req)
        if key == self._blocked:
            return False  # nothing freed since it found no instance
        inst = self._route(req, is_long)
        if inst is None:
            self._blocked = key
            return False
        chunk = cfg.sarathi_batch_tokens
        if req.spec.prompt_tokens > cfg.sarathi_long_prefill_tokens:
            chunk = cfg.sarathi_long_prefill_tokens
        iid = inst.instance_id
        load = self._load.setdefault(iid, _Load())
        reason = f"least outstanding prefill tokens ({load.prompt_tokens}): {iid}"
        action = st.start_mixed_prefill(
            req,
            inst,
            chunk_tokens=chunk,
            batch_tokens=cfg.sarathi_batch_tokens,
            now_s=now_s,
            reason=reason,
        )
        flight = _Flight(iid, is_long, req.spec.prompt_tokens)
        self._flights[req.request_id] = flight
        self._count_full(load, -1)
        load.add(flight, 1)
        self._count_full(load, 1)
        out.append(action)
        return True

    def _settle(self, request_id: str) -> None:
        """Free the place of `request_id`'s mixed prefill if it is no longer in flight."""
        flight = self._flights.get(request_id)
        if flight is None:
            return
        req = self._state.requests.get(request_id)
        if (
            req is not None
            and req.state is RequestState.PREFILLING
            and req.prefill_ids == (flight.instance_id,)
        ):
            return
        del self._flights[request_id]
        load = self._load[flight.instance_id]
        self._count_full(load, -1)
        load.add(flight, -1)
        self._count_full(load, 1)
        self._shrunk.add(flight.instance_id)
        self._num_settled += 1

    def _route_key(self, req: RequestRecord) -> tuple[str, int, int, int, int]:
        """Changes whenever an instance that refused `req` might take it now."""
        st = self._state
        return (
            req.request_id,
            st.ledger.num_frees,
            st.pool.total_offers,
            st.census.version,
            self._num_settled,
        )

    def _count_full(self, load: _Load, sign: int) -> None:
        """Count `load`'s instance in (1) or out (-1) of `_full`."""
        cfg = self._config
        short_full = load.num >= cfg.sarathi_max_partial_prefills
        long_full = short_full or load.num_long >= cfg.sarathi_max_long_partial_prefills
        self._full[0] += sign * short_full
        self._full[1] += sign * long_full

    def _route(self, req: RequestRecord, is_long: bool) -> InstanceRecord | None:
        """The least loaded instance with a free prefill place of `req`'s kind and room."""
        cfg, st = self._config, self._state
        need = req.spec.total_tokens
        if self._full[is_long] >= len(st.instances):
            return None  # every place of its kind is taken (O(1) while saturated)
        self._refresh_heap()
        heap = self._heap
        passed: set[_RouteKey] = set()  # looked at: pushed back after
        found: InstanceRecord | None = None
        while heap:
            entry = heapq.heappop(heap)
            inst = st.instances.get(entry.instance_id)
            if inst is None:
                continue  # gone
            key = self._key(inst)
            if key != entry:
                if key > entry:  # grew: no other entry of it is below this one
                    heapq.heappush(heap, key)
                continue  # shrank: its fresher entry is further up
            load = self._load.get(inst.instance_id)
            if entry in passed or (
                load is not None and load.num >= cfg.sarathi_max_partial_prefills
            ):
                continue  # the same key pushed twice, or full (a settle pushes it again)
            passed.add(entry)
            if not (
                (
                    is_long
                    and load is not None
                    and load.num_long >= cfg.sarathi_max_long_partial_prefills
                )
                or inst.prefill_id is not None
                or inst.held_for is not None
                or len(inst.decoding) + (0 if load is None else load.num) >= cfg.max_decode_batch
                or not st.ledger.can_allocate(inst.instance_id, need)
            ):
                found = inst
                break
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def _key(self, inst: InstanceRecord) -> _RouteKey:
        load = self._load.get(inst.instance_id)
        tokens = 0 if load is None else load.prompt_tokens
        return _RouteKey(tokens, len(inst.decoding), inst.tiebreak, inst.instance_id)

    def _refresh_heap(self) -> None:
        """Fresh entries for the instances whose key may have shrunk (all after a rebuild)."""
        st = self._state
        if self._rebuild or len(self._heap) > 4 * len(st.instances) + 64:
            self._heap = [self._key(inst) for inst in st.instances.values()]
            heapq.heapify(self._heap)
            self._rebuild = False
        else:
            for iid in self._shrunk:
                inst = st.instances.get(iid)
                if inst is not None:
                    heapq.heappush(self._heap, self._key(inst))
        self._shrunk.clear()

    def _place_sp(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """Hold drained instances until they can hold `req`'s KV, then SP-prefill it there.

        Only instances that leave a group of at most `max_sp_degree` able to hold the KV are
        held (largest first), so holds never fill the cap with instances too small for it;
        holds that can no longer complete (an instance went down) are released (and see
        `_yield_holds_to`).
        """
        cfg, st = self._config, self._state
        self._sp_holder = req.request_id
        held = [st.instances[i] for i in req.held_ids if i in st.instances]
        need = req.spec.total_tokens
        if held and not self._can_complete(held, need):
            st.release_holds(req)
            held = []
        capacity = sum(st.ledger.capacity(i.instance_id) for i in held)
        for inst in self._drained():
            if len(held) >= cfg.max_sp_degree or capacity >= need:
                break
            if self._can_complete([*held, inst], need):
                st.hold(req, inst)
                held.append(inst)
                capacity += st.ledger.capacity(inst.instance_id)
        if capacity < need or sum(st.ledger.free_tokens(i.instance_id) for i in held) < need:
            return False  # the rest of its group, or the held ones' KV, is still busy
        group = rank_order(st.release_holds(req))
        reason = f"SP group of {len(group)} holding {need} KV tokens (too long for one)"
        out.append(st.start_prefill(req, group, decode_in_place=True, now_s=now_s, reason=reason))
        return True

    def _can_complete(self, group: list[InstanceRecord], need: int) -> bool:
        """True when `group` plus the largest other GENERAL instances, `max_sp_degree` in all,
        have `need` KV tokens of capacity."""
        st = self._state
        ids = {i.instance_id for i in group}
        others = sorted(
            (
                st.ledger.capacity(iid)
                for iid, inst in st.instances.items()
                if inst.role is InstanceRole.GENERAL and iid not in ids
            ),
            reverse=True,
        )
        room = self._config.max_sp_degree - len(group)
        capacity = sum(st.ledger.capacity(iid) for iid in ids) + sum(others[: max(room, 0)])
        return room >= 0 and capacity >= need

    def _drained(self) -> list[InstanceRecord]:
        """GENERAL instances free for an SP prefill (no prefill in flight, not held), largest
        KV capacity first, then most free KV."""
        st = self._state
        free = [
            inst
            for inst in st.instances.values()
            if inst.role is InstanceRole.GENERAL
            and inst.prefill_id is None
            and inst.held_for is None
            and not self._load.get(inst.instance_id, _Load()).num
        ]
        return sorted(
            free,
            key=lambda i: (
                -st.ledger.capacity(i.instance_id),
                -st.ledger.free_tokens(i.instance_id),
                i.tiebreak,
            ),
        )


@dataclass(frozen=True, slots=True)
class _Flight:
    """A mixed prefill in flight."""

    instance_id: str  # where it runs
    is_long: bool  # LONG class (counts against sarathi_max_long_partial_prefills)
    prompt_tokens: int  # its prompt (outstanding until it ends)


@dataclass(slots=True)
class _Load:
    """The mixed prefills in flight on one instance."""

    num: int = 0  # prefills in flight
    num_long: int = 0  # of them LONG
    prompt_tokens: int = 0  # their prompts, summed (the router's load)

    def add(self, flight: _Flight, sign: int) -> None:
        """Count `flight` in (sign 1) or out (sign -1)."""
        self.num += sign
        self.num_long += sign * flight.is_long
        self.prompt_tokens += sign * flight.prompt_tokens


def _key(req: RequestRecord) -> tuple[int, int]:
    return (-req.spec.priority, req.seq)
