"""`StateBook`: the data every policy shares and the bookkeeping that keeps it consistent.

Requests, instances, the KV ledger, role census, instance pool, class queues and counters of
one policy, with the small operations every primitive of `ClusterState` (controlplane.core.state)
builds on: validated state moves with per-class counters, queueing, re-offering instances,
holds and role changes; and the `ClusterView` snapshot. The timers and pause candidates live
in their own objects (`Preemption`, `RefusalBackoff`, `Deadlines`), read through the methods
here.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from controlplane.core import lifecycle
from controlplane.core.accounting import KvLedger
from controlplane.core.actions import Action
from controlplane.core.config import SchedulerConfig
from controlplane.core.deadlines import Deadlines
from controlplane.core.pool import InstancePool
from controlplane.core.preemption import Preemption, VictimEntry
from controlplane.core.queues import RequestQueue
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.refusals import RefusalBackoff
from controlplane.core.roles import RoleCensus, RolePlan
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import (
    ClassStats,
    ClusterView,
    InstanceRole,
    RequestClass,
    RequestState,
)

_LONG = RequestClass.LONG
_S = RequestState


class StateBook:
    """Requests, instances, KV ledger, queues and indices of one policy (see `ClusterState`)."""

    def __init__(self, config: SchedulerConfig, rng: Tiebreak, role_plan: RolePlan) -> None:
        self.config = config
        self.rng = rng
        self.role_plan = role_plan
        self.ledger = KvLedger()
        self.pool = InstancePool(self.ledger, config.max_decode_batch)
        self.census = RoleCensus()
        self.requests: dict[str, RequestRecord] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.queues = {c: RequestQueue() for c in RequestClass}
        self.queued_tokens: Counter[RequestClass] = Counter()
        self.counts: Counter[tuple[RequestClass, RequestState]] = Counter()
        self.stats: Counter[str] = Counter()
        self.transfer_wait: deque[str] = deque()  # TRANSFERRING_KV requests without a dst
        self.transfer_wait_joins = 0  # requests put in transfer_wait, ever
        self.ready_to_decode: deque[str] = deque()  # KV arrived at dst; StartDecode next
        self.to_reject: deque[tuple[str, str]] = deque()  # (request id, reason) from admission
        self.pending: list[Action] = []  # actions produced while observing (Cancel)
        self.completed: list[str] = []  # became terminal since take_completed()
        self.resumable: set[str] = set()  # paused requests whose group may be free now
        # Timers and victims, read through the methods of "timers and victims" below.
        self.preemption = Preemption(config, self.requests)
        self.refusal_backoff = RefusalBackoff(config, self.ledger)
        self.deadlines = Deadlines(self.requests)
        self.next_seq = 0
        # Set by anything that may let a waiting request start: an instance re-offered, a
        # request queued. schedule() skips planning while it is clear and no timer is due.
        self.dirty = True

    # ---- lifecycle bookkeeping -------------------------------------------------------------

    def set_state(self, req: RequestRecord, rule: lifecycle.TransitionRule) -> None:
        """Move `req` by `rule` (validated) and keep the per-class counters."""
        new_state = lifecycle.transition(rule, req.request_id, req.state)
        self.counts[(req.request_class, req.state)] -= 1
        self.counts[(req.request_class, new_state)] += 1
        req.state = new_state

    def enqueue(self, req: RequestRecord) -> None:
        """Put a QUEUED request in its class queue (admission order within a priority)."""
        self.queues[req.request_class].push(req.request_id, (-req.spec.priority, req.seq))
        self.queued_tokens[req.request_class] += req.spec.prompt_tokens
        self.dirty = True

    def dequeue(self, req: RequestRecord) -> None:
        """Take a request out of its queue (no-op when it is not queued)."""
        queue = self.queues[req.request_class]
        if req.request_id in queue:
            queue.remove(req.request_id)
            self.queued_tokens[req.request_class] -= req.spec.prompt_tokens

    def refresh(self, instance_ids: Iterable[str]) -> None:
        """Re-offer instances after a change; paused requests on free slots may resume."""
        for instance_id in instance_ids:
            inst = self.instances.get(instance_id)
            if inst is None:
                continue
            self.dirty = True
            self.pool.refresh(inst)
            if inst.prefill_id is None and inst.paused:
                self.resumable.update(inst.paused)

    def wait_for_transfer(self, request_id: str, *, front: bool = False) -> None:
        """Queue a prefilled request for a KV transfer destination (front: a retry)."""
        if front:
            self.transfer_wait.appendleft(request_id)
        else:
            self.transfer_wait.append(request_id)
        self.transfer_wait_joins += 1

    def snapshot(self, policy_name: str, now_s: float) -> ClusterView:
        """Queues, per-class counts, instances and totals at `now_s` (changes nothing)."""
        classes = tuple(
            ClassStats(
                request_class=c,
                queued=self.counts[(c, _S.QUEUED)],
                prefilling=self.counts[(c, _S.PREFILLING)],
                paused=self.counts[(c, _S.PAUSED)],
                transferring_kv=self.counts[(c, _S.TRANSFERRING_KV)],
                decoding=self.counts[(c, _S.DECODING)],
                finished_total=self.counts[(c, _S.FINISHED)],
                queued_tokens=self.queued_tokens[c],
            )
            for c in RequestClass
        )
        instances = tuple(
            self.instances[i].to_view(self.ledger.used(i), self.ledger.requests_on(i))
            for i in sorted(self.instances)
        )
        stats = self.stats
        return ClusterView(
            at_s=now_s,
            policy=policy_name,
            classes=classes,
            instances=instances,
            preemptions_total=stats["preemptions"],
            colocations_total=stats["colocations"],
            decode_stalls_total=stats["decode_stalls"],
            kv_transfers_total=stats["kv_transfers"],
            cancelled_total=stats["cancelled"],
            failed_total=stats["failed"],
        )

    # ---- instance bookkeeping --------------------------------------------------------------

    def change_role(self, inst: InstanceRecord, role: InstanceRole) -> None:
        """Move an idle instance to another role (census and pools follow)."""
        assert not inst.decoding and inst.prefill_id is None, f"{inst.instance_id} is busy"
        self.census.remove(inst.role, inst.spec)
        self.census.add(role, inst.spec)
        self.pool.change_role(inst, role)
        self.stats["role_changes"] += 1
        self.dirty = True

    def hold(self, req: RequestRecord, inst: InstanceRecord) -> None:
        """Keep `inst` free of new work until the queued `req` starts (starvation bound)."""
        assert inst.held_for is None, f"{inst.instance_id} already held for {inst.held_for}"
        inst.held_for = req.request_id
        req.held_ids += (inst.instance_id,)
        self.refresh((inst.instance_id,))

    def release_holds(self, req: RequestRecord) -> list[InstanceRecord]:
        """Stop holding instances for `req`; returns those still up, in hold order."""
        held = [self.instances[i] for i in req.held_ids if i in self.instances]
        req.held_ids = ()
        for inst in held:
            if inst.held_for == req.request_id:
                inst.held_for = None
        self.refresh(inst.instance_id for inst in held)
        return held

    def group_is_free(self, req: RequestRecord) -> bool:
        """True when every instance of `req`'s prefill group has a free prefill slot."""
        return all(self.instances[i].prefill_id is None for i in req.prefill_ids)

    # ---- timers and victims (see preemption, refusals, deadlines) --------------------------

    def preemptible(self, req: RequestRecord) -> bool:
        """See `Preemption.preemptible`."""
        return self.preemption.preemptible(req)

    def chunks_before_pause(self, req: RequestRecord) -> int:
        """See `Preemption.chunks_before_pause`."""
        return self.preemption.chunks_before_pause(req)

    def pause_due(self, req: RequestRecord) -> bool:
        """See `Preemption.pause_due`."""
        return self.preemption.pause_due(req)

    def pop_victim(self) -> tuple[VictimEntry, RequestRecord] | None:
        """See `Preemption.pop_victim`."""
        return self.preemption.pop_victim()

    def push_victim(self, entry: VictimEntry) -> None:
        """See `Preemption.push_victim`."""
        self.preemption.push_victim(entry)

    def pop_starving(self, now_s: float) -> list[RequestRecord]:
        """See `Preemption.pop_starving`."""
        return self.preemption.pop_starving(now_s)

    def next_starvation_s(self) -> float:
        """See `Preemption.next_starvation_s`."""
        return self.preemption.next_starvation_s()

    def remember_refusal(
        self, req: RequestRecord, instance_ids: Iterable[str], at_s: float
    ) -> None:
        """See `RefusalBackoff.remember` (the one back-off rule)."""
        self.refusal_backoff.remember(req, instance_ids, at_s)

    def refused(self, req: RequestRecord, instance_id: str, now_s: float) -> bool:
        """See `RefusalBackoff.is_refused`."""
        return self.refusal_backoff.is_refused(req, instance_id, now_s)

    def pop_lapsed_refusals(self, now_s: float) -> bool:
        """See `RefusalBackoff.pop_lapsed`."""
        return self.refusal_backoff.pop_lapsed(now_s)

    def next_refusal_lapse_s(self) -> float:
        """See `RefusalBackoff.next_lapse_s`."""
        return self.refusal_backoff.next_lapse_s()

    def add_deadline(self, req: RequestRecord) -> None:
        """Fail `req` when its spec's deadline passes (see `pop_expired_deadlines`)."""
        self.deadlines.add(req)

    def pop_expired_deadlines(self, now_s: float) -> list[RequestRecord]:
        """See `Deadlines.pop_expired`."""
        return self.deadlines.pop_expired(now_s)

    # ---- internals -------------------------------------------------------------------------

    def _add_decoder(self, req: RequestRecord, instance_ids: tuple[str, ...]) -> None:
        req.decode_ids = instance_ids
        for instance_id in instance_ids:
            inst = self.instances[instance_id]
            inst.decoding.add(req.request_id)
            if req.request_class is _LONG:
                inst.num_long_decoding += 1
