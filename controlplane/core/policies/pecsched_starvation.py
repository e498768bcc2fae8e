"""PecSched's bounds on how long a long request waits behind shorts.

- The starvation bound (`protect_starving`, `resume_paused`): a paused long prefill whose total
  pause time reached `max_pause_s` is protected (`ClusterState.protect`: its group takes no new
  short work, and it is paused again only as its duty cycle allows); paused prefills resume
  once their whole group is free, protected ones first.
- Aging (`AgedLongs`, off unless `long_aging_s` is set): a long queued that long goes before
  any short; when the open instances cannot take it, it holds them one by one as they become
  open (shorts cannot take held ones) until the held ones can. Only the head of the long queue
  holds, so two aged longs never each hold part of what both need.
Both change `ClusterState` only through its methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from controlplane.core.actions import Action
from controlplane.core.base import rank_order
from controlplane.core.config import SchedulerConfig
from controlplane.core.records import InstanceRecord, RequestRecord, Slot
from controlplane.core.state import ClusterState
from controlplane.core.types import InstanceRole, RequestState


def protect_starving(state: ClusterState, now_s: float) -> None:
    """Protect every paused long prefill whose starvation bound is reached by `now_s`."""
    for req in state.pop_starving(now_s):
        state.protect(req)


def resume_paused(state: ClusterState, now_s: float, out: list[Action]) -> list[str]:
    """Resume the paused long prefills offered for resumption whose whole group is free,
    protected ones first, then in admission order; returns the ids resumed."""
    if not state.resumable:
        return []
    candidates = sorted(
        (state.requests[r] for r in state.resumable if r in state.requests),
        key=lambda r: (not r.is_protected, r.seq),
    )
    state.resumable.clear()
    resumed: list[str] = []
    for req in candidates:
        if req.state is RequestState.PAUSED and state.group_is_free(req):
            why = "starvation bound reached" if req.is_protected else "group free again"
            out.append(state.resume(req, now_s, why))
            resumed.append(req.request_id)
    return resumed


class AgedLongs:
    """Gathers a group for the aged head of the long queue by holding open instances."""

    def __init__(self, config: SchedulerConfig, state: ClusterState) -> None:
        self._config = config
        self._state = state
        self._holder: str | None = None  # the aged long holding instances, if any

    def is_aged(self, req: RequestRecord, now_s: float) -> bool:
        """Whether queued `req` has waited `long_aging_s` or more (never without aging)."""
        aging_s = self._config.long_aging_s
        return aging_s is not None and now_s - req.spec.arrival_s >= aging_s

    def wake_s(self, oldest: RequestRecord | None, now_s: float) -> float:
        """When `oldest`, the head of the long queue, ages if later than `now_s` (else inf)."""
        aging_s = self._config.long_aging_s
        if aging_s is None or oldest is None:
            return math.inf
        aged_s = oldest.spec.arrival_s + aging_s
        return aged_s if aged_s > now_s else math.inf

    def gather(
        self, head: RequestRecord, wanted_degree: Callable[[RequestRecord], int]
    ) -> list[InstanceRecord] | None:
        """Hold open general instances for `head`, the aged head of the long queue, until
        their free KV holds its prompt + output and they number `wanted_degree(head)` (asked
        once the holds are settled), at most `max_sp_degree`. Returns the group, released and
        in rank order, when they do; else None, `head` keeping its holds. Holds that can never
        take it (`max_sp_degree` of them too small) are released and gathered afresh at once,
        once per call: released for a later call, nothing might ever wake the plan again."""
        st = self._state
        self._hand_holds_to(head)
        for _ in range(2):
            held, fits = self._hold_more(head, wanted_degree)
            if fits:
                return rank_order(st.release_holds(head))
            if held < self._config.max_sp_degree:
                return None  # more instances may open later
            st.release_holds(head)
        return None

    def _hold_more(
        self, head: RequestRecord, wanted_degree: Callable[[RequestRecord], int]
    ) -> tuple[int, bool]:
        """Hold the best open general instances for `head` while its held ones fall short and
        number below `max_sp_degree`; returns how many it holds and whether they suffice."""
        st = self._state
        held = [st.instances[i] for i in head.held_ids if i in st.instances]
        free_tokens = sum(st.ledger.free_tokens(i.instance_id) for i in held)
        wanted = wanted_degree(head)
        need = head.spec.total_tokens
        while (free_tokens < need or len(held) < wanted) and len(held) < self._config.max_sp_degree:
            inst = st.pool.best(InstanceRole.GENERAL, Slot.OPEN)
            if inst is None:
                break
            st.hold(head, inst)
            held.append(inst)
            free_tokens += st.ledger.free_tokens(inst.instance_id)
        return len(held), free_tokens >= need and len(held) >= wanted

    def _hand_holds_to(self, head: RequestRecord) -> None:
        """Only the head of the long queue holds instances for an aged start: when another long
        became the head (a higher priority arrived), the former head's holds are released, so
        two aged longs never each hold part of what both need (a deadlock)."""
        holder = self._state.requests.get(self._holder) if self._holder else None
        if holder is not None and holder is not head and holder.state is RequestState.QUEUED:
            self._state.release_holds(holder)
        self._holder = head.request_id
