"""`BasePolicy`: the `Policy` plumbing every policy shares; subclasses only decide placement.

`schedule()` runs, in order: deadlines, admission rejections, the Cancels produced while
observing, StartDecode for arrived KV, TransferKV for prefilled short requests, then the
subclass's `_plan()` (prefills, pauses, resumes). `_plan()` runs only when something that could
let a request start changed since the last call (an instance re-offered, a request queued) or
a timer of the policy is due, so an idle call costs O(1). Helpers here are the placement vocabulary
the policy files speak: place a short on the best instance of some slots, pick an SP group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from controlplane.core import lifecycle
from controlplane.core.accounting import check_fits
from controlplane.core.actions import Action, Decision
from controlplane.core.config import LongDecodeSharing, SchedulerConfig
from controlplane.core.errors import CoreError, ErrorCode
from controlplane.core.events import Event
from controlplane.core.observer import apply_event
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.roles import RolePlan
from controlplane.core.state import ClusterState
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import (
    AdmissionVerdict,
    ClusterView,
    InstanceRole,
    RequestClass,
    RequestSpec,
    RequestState,
    RequestView,
    classify,
)

_S = RequestState
_ROLE = InstanceRole
_MAX_TRANSFER_SKIPS = 32  # unplaceable waiting transfers passed over per schedule() call
_PACK_SCAN = 4  # most loaded short-decode instances tried per transfer (elastic pool)


class BasePolicy:
    """Shared implementation of the `Policy` protocol; subclasses implement `_plan`."""

    def __init__(
        self, name: str, config: SchedulerConfig, rng: Tiebreak, role_plan: RolePlan
    ) -> None:
        self._name = name
        self._config = config
        self._state = ClusterState(config, rng, role_plan)
        self._wake_at_s = math.inf  # earliest time a timer may change the plan
        # (request id, role, pool offers) of the last long request that found no group
        self._long_blocked: tuple[str, InstanceRole, int] | None = None
        # _transfer_key() when every waiting transfer was last found unplaceable
        self._transfers_blocked: tuple[int, int, int, int] | None = None

    @property
    def name(self) -> str:
        """Registry name of the policy."""
        return self._name

    @property
    def config(self) -> SchedulerConfig:
        """Effective configuration."""
        return self._config

    # ---- what the subclasses decide --------------------------------------------------------

    def _prefill_role(self, request_class: RequestClass) -> InstanceRole:
        """Role of the instances that prefill requests of `request_class`."""
        return _ROLE.GENERAL

    def _plan(self, now_s: float, out: list[Action]) -> None:
        """Append this policy's prefill/pause/resume actions for `now_s` to `out`.

        Must reach a fixpoint: called again with nothing changed, it would do nothing.
        """
        raise AssertionError(f"{type(self).__name__} must implement _plan")

    def _next_timer_s(self, now_s: float) -> float:
        """When a time-based rule may next change the plan (inf: never without events)."""
        return math.inf

    def _decode_batch_limit(self) -> int:
        """Most shorts a short-decode instance takes for decoding (the configured batch)."""
        return self._config.max_decode_batch

    # ---- Policy protocol -------------------------------------------------------------------

    def observe(self, events: Sequence[Event]) -> None:
        """Apply events in order (see controlplane.core.observer)."""
        for event in events:
            apply_event(self._state, event, self.check_admission)

    def schedule(self, now_s: float) -> Decision:
        """Decide the actions for `now_s` (see module docstring for the order)."""
        out: list[Action] = []
        self._expire_deadlines(now_s)
        self._reject_admissions(out)
        out.extend(self._state.pending)
        self._state.pending.clear()
        st = self._state
        if st.pop_lapsed_refusals(now_s):  # a refused placement may be retried
            st.dirty = True
            self._transfers_blocked = self._long_blocked = None
        self._start_decodes(out)
        self._place_transfers(now_s, out)
        if st.dirty or now_s >= self._wake_at_s:
            self._plan(now_s, out)
            st.dirty = False
            self._wake_at_s = min(self._next_timer_s(now_s), st.next_refusal_lapse_s())
        return Decision(tuple(out))

    def check_admission(self, spec: RequestSpec) -> AdmissionVerdict:
        """Can the cluster, as it is now, ever hold `spec`? Changes nothing."""
        request_class = classify(spec.prompt_tokens, self._config.short_threshold_tokens)
        role = self._prefill_role(request_class)
        degree = self._config.max_sp_degree if request_class is RequestClass.LONG else 1
        capacities = self._state.census.capacities(role)
        if sum(capacities[-degree:]) >= spec.total_tokens:
            return AdmissionVerdict(ok=True)
        return check_fits(spec.total_tokens, capacities, degree, f"{role.value} instances")

    def request_view(self, request_id: str) -> RequestView:
        """Snapshot of one tracked request."""
        req = self._state.requests.get(request_id)
        if req is None:
            raise CoreError(ErrorCode.UNKNOWN_REQUEST, f"no request {request_id!r}")
        return req.to_view()

    def cluster_view(self, now_s: float) -> ClusterView:
        """Snapshot of queues and instances."""
        return self._state.snapshot(self._name, now_s)

    def num_active_requests(self) -> int:
        """Requests not yet terminal."""
        counts = self._state.counts
        return sum(counts[(c, s)] for c in RequestClass for s in _S if not s.is_terminal)

    def take_completed(self) -> tuple[RequestView, ...]:
        """Views of newly terminal requests; they are forgotten."""
        st = self._state
        views = tuple(st.requests.pop(r).to_view() for r in st.completed)
        st.completed.clear()
        return views

    # ---- housekeeping ----------------------------------------------------------------------

    def _expire_deadlines(self, now_s: float) -> None:
        st = self._state
        for req in st.pop_expired_deadlines(now_s):
            st.cancel(req, lifecycle.FAIL, "deadline exceeded", now_s)

    def _reject_admissions(self, out: list[Action]) -> None:
        st = self._state
        while st.to_reject:
            request_id, reason = st.to_reject.popleft()
            req = st.requests.get(request_id)
            if req is not None and req.state is _S.QUEUED:
                out.append(st.reject(req, reason))

    def _start_decodes(self, out: list[Action]) -> None:
        st = self._state
        while st.ready_to_decode:
            req = st.requests.get(st.ready_to_decode.popleft())
            if req is not None and req.state is _S.TRANSFERRING_KV and req.decode_ids:
                out.append(st.start_decode(req, f"KV arrived from {req.prefill_ids[0]}"))

    def _place_transfers(self, now_s: float, out: list[Action]) -> None:
        """Place prefilled shorts that wait for a decode destination, oldest first.

        One that cannot be placed now (no room on its target) is skipped, not waited for: up
        to `_MAX_TRANSFER_SKIPS` of them are passed over per call, keeping their order, so a
        request that fits elsewhere proceeds. Nothing is rescanned until an instance is
        re-offered or a request joins the wait.
        """
        st = self._state
        wait = st.transfer_wait
        key = self._transfer_key()
        if not wait or key == self._transfers_blocked:
            return
        skipped: list[str] = []
        while wait and len(skipped) < _MAX_TRANSFER_SKIPS:
            request_id = wait.popleft()
            req = st.requests.get(request_id)
            if (
                req is None
                or req.state is not _S.TRANSFERRING_KV
                or req.transfer_dst
                or req.decode_ids
            ):
                continue
            action = self._place_transfer(req, now_s)
            if action is None:
                skipped.append(request_id)
            else:
                out.append(action)
        wait.extendleft(reversed(skipped))
        # all that remain were refused (or not looked at: then retry next call)
        blocked = len(skipped) == len(wait)
        self._transfers_blocked = self._transfer_key() if blocked else None

    def _transfer_key(self) -> tuple[int, int, int, int]:
        """Changes whenever a waiting transfer that found no room might find some."""
        st = self._state
        return (
            st.pool.total_offers,
            st.ledger.num_frees,
            st.census.version,
            st.transfer_wait_joins,
        )

    def _place_transfer(self, req: RequestRecord, now_s: float) -> Action | None:
        """TransferKV to a short-decode instance (or decode where prefilled), None if no room.

        It decodes where prefilled when no short-decode instance could ever hold it (the pool
        shrank or lost its large members since the prefill started) or transfers kept failing.
        """
        st = self._state
        decoders = st.census.capacities(_ROLE.SHORT_DECODE)
        never_fits = not decoders or decoders[-1] < req.spec.total_tokens
        if never_fits or req.transfer_attempts >= self._config.max_kv_transfer_attempts:
            if not st.ledger.can_allocate(req.prefill_ids[0], req.spec.max_new_tokens):
                return None
            why = "no short-decode instance holds it" if never_fits else "KV transfers kept failing"
            return st.start_decode(req, f"decode where prefilled: {why}")
        dst = self._transfer_target(req, now_s)
        if dst is None:
            return None
        return st.begin_transfer(req, dst, "short-decode instance with room")

    def _transfer_target(self, req: RequestRecord, now_s: float) -> InstanceRecord | None:
        """Short-decode instance for `req`'s KV, or None when none has room (free KV, and a
        decode batch below `_decode_batch_limit()`).

        Elastic pool: the most loaded one with room among the `_PACK_SCAN` most loaded (bin
        packing, so spare members empty out and can be given back), else the one with the
        most free KV. Fixed pool (the paper's): the one with the most free KV.
        """
        st = self._state
        need = req.spec.total_tokens
        batch = self._decode_batch_limit()
        if self._config.short_decode_elastic:
            for inst in st.pool.top(_ROLE.SHORT_DECODE, Slot.OPEN, _PACK_SCAN, most_loaded=True):
                if (
                    len(inst.decoding) < batch
                    and st.ledger.can_allocate(inst.instance_id, need)
                    and not (req.refusals and st.refused(req, inst.instance_id, now_s))
                ):
                    return inst
        dst = self._best_for(req, _ROLE.SHORT_DECODE, Slot.OPEN, now_s)
        if (
            dst is None
            or len(dst.decoding) >= batch
            or not self._state.ledger.can_allocate(dst.instance_id, req.spec.total_tokens)
        ):
            return None
        return dst

    # ---- placement vocabulary --------------------------------------------------------------

    def _head(self, request_class: RequestClass) -> RequestRecord | None:
        """Best queued request of a class, or None."""
        top = self._state.queues[request_class].peek()
        return None if top is None else self._state.requests[top[1]]

    def _oldest(self) -> RequestRecord | None:
        """The best queued request of either class: higher priority, then admission order."""
        short, long = self._head(RequestClass.SHORT), self._head(RequestClass.LONG)
        if short is None or long is None:
            return short or long
        key_short = (-short.spec.priority, short.seq)
        key_long = (-long.spec.priority, long.seq)
        return short if key_short < key_long else long

    def _place_short(
        self,
        req: RequestRecord,
        now_s: float,
        out: list[Action],
        slots: Sequence[Slot],
        *,
        decode_in_place: bool,
        role: InstanceRole = _ROLE.GENERAL,
    ) -> bool:
        """Start `req` on the best instance of the first of `slots` that can hold it.

        An instance decoding a long request (Slot.LONG_DECODE) gets a Colocate when the
        config's sharing is COLOCATE, else a StartPrefill that stalls the long decode.
        """
        st = self._state
        need = req.spec.total_tokens if decode_in_place else req.spec.prompt_tokens
        for slot in slots:
            inst = self._best_for(req, role, slot, now_s)
            if inst is None or not st.ledger.can_allocate(inst.instance_id, need):
                continue
            colocate = False
            if slot is Slot.LONG_DECODE:
                colocate = self._config.long_decode_sharing is LongDecodeSharing.COLOCATE
                if not colocate:
                    st.stats["decode_stalls"] += 1
            reason = f"{_SLOT_REASON[slot]} {inst.instance_id}"
            action = st.start_prefill(
                req,
                [inst],
                decode_in_place=decode_in_place,
                now_s=now_s,
                reason=reason,
                colocate=colocate,
            )
            out.append(action)
            return True
        return False

    def _place_long(
        self, req: RequestRecord, now_s: float, out: list[Action], role: InstanceRole
    ) -> bool:
        """Start `req` on the smallest SP group of open `role` instances holding its KV.

        The group is larger when `target_prefill_tokens_per_instance` asks for it (as far as
        open instances allow). It decodes in place on the same group.
        """
        offers = self._state.pool.offers(role, Slot.OPEN)
        if self._long_blocked == (req.request_id, role, offers):
            return False  # no instance became open or freer since it last found no group
        group = self._select_group(req, role, now_s)
        if group is None:
            self._long_blocked = (req.request_id, role, offers)
            return False
        ids = ", ".join(i.instance_id for i in group)
        reason = f"SP group of {len(group)} holding {req.spec.total_tokens} KV tokens: {ids}"
        st = self._state
        chunk = self._long_chunk_tokens(req, group)
        out.append(
            st.start_prefill(
                req, group, decode_in_place=True, now_s=now_s, reason=reason, chunk_tokens=chunk
            )
        )
        return True

    def _long_chunk_tokens(self, req: RequestRecord, group: Sequence[InstanceRecord]) -> int | None:
        """Chunk size of a long prefill started on `group`; None: the config's rule
        (`SchedulerConfig.prefill_chunk_tokens` at the group's size)."""
        return None

    def _select_group(
        self, req: RequestRecord, role: InstanceRole, now_s: float
    ) -> list[InstanceRecord] | None:
        st, cfg = self._state, self._config
        candidates = st.pool.top(role, Slot.OPEN, cfg.max_sp_degree + len(req.refusals))
        if req.refusals:
            candidates = [i for i in candidates if not st.refused(req, i.instance_id, now_s)]
            candidates = candidates[: cfg.max_sp_degree]
        wanted = min(self._wanted_degree(req), len(candidates))
        held = 0
        for size, inst in enumerate(candidates, start=1):
            held += st.ledger.free_tokens(inst.instance_id)
            if held >= req.spec.total_tokens and size >= wanted:
                return rank_order(candidates[:size])
        return None

    def _best_for(
        self, req: RequestRecord, role: InstanceRole, slot: Slot, now_s: float
    ) -> InstanceRecord | None:
        """The pool's best instance of (role, slot) that has not refused `req` lately."""
        st = self._state
        if not req.refusals:
            return st.pool.best(role, slot)
        for inst in st.pool.top(role, slot, len(req.refusals) + 1):
            if not st.refused(req, inst.instance_id, now_s):
                return inst
        return None

    def _wanted_degree(self, req: RequestRecord) -> int:
        """SP degree a prefill-time target asks for (1 without a target), capped by the max."""
        per_instance = self._config.target_prefill_tokens_per_instance
        if per_instance is None:
            return 1
        return min(self._config.max_sp_degree, -(-req.spec.prompt_tokens // per_instance))

    def _reject_if_never_fits(self, req: RequestRecord, out: list[Action]) -> bool:
        """Reject `req` when the cluster as it is now can never hold it; True if rejected."""
        version = self._state.census.version
        if req.fits_census_version == version:
            return False
        verdict = self.check_admission(req.spec)
        if verdict.ok:
            req.fits_census_version = version
            return False
        out.append(self._state.reject(req, verdict.reason))
        return True


def rank_order(group: list[InstanceRecord]) -> list[InstanceRecord]:
    """SP ranks by node, so ranks of one node are neighbours (cheaper SP hops)."""
    return sorted(group, key=lambda i: (i.spec.node_id, i.instance_id))


_SLOT_REASON = {
    Slot.OPEN: "open instance",
    Slot.LONG_DECODE: "instance decoding a long request",
    Slot.PAUSED_HOST: "instance holding a paused long prefill",
    Slot.BUSY: "busy instance",
}
