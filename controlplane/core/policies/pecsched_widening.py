"""PecSched's SP widening: how many instances a long prefill takes when some are idle.

`widened_degree` only reads `ClusterState`: with `widen_sp_when_idle`, a long prefill
takes its share of the open general instances (shared among the queued longs), leaving one plus
one per running short prefill open for arriving shorts, never beyond `max_sp_degree` and never
below the degree asked otherwise. Shorts take widened groups back by preemption at chunk
boundaries (see pecsched_victims.py).
"""

from __future__ import annotations

from controlplane.core.config import SchedulerConfig
from controlplane.core.records import RequestRecord, Slot
from controlplane.core.state import ClusterState
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_WIDEN_SCAN = 64  # most open instances counted (and kept for shorts) when widening an SP group


def widened_degree(
    config: SchedulerConfig, state: ClusterState, req: RequestRecord, wanted: int
) -> int:
    """SP degree for `req` given the `wanted` one: with `widen_sp_when_idle` and a long `req`,
    at least its share of the open general instances, leaving one plus one per running short
    prefill open (both counts capped at `_WIDEN_SCAN`, so a placement stays O(log n) at any
    cluster size), capped by `max_sp_degree`; else `wanted`."""
    if not config.widen_sp_when_idle or req.request_class is not RequestClass.LONG:
        return wanted
    counts = state.counts
    reserve = min(_WIDEN_SCAN, 1 + counts[(RequestClass.SHORT, RequestState.PREFILLING)])
    queued = max(1, counts[(RequestClass.LONG, RequestState.QUEUED)])
    limit = min(config.max_sp_degree * queued, _WIDEN_SCAN) + reserve
    share = (len(state.pool.top(InstanceRole.GENERAL, Slot.OPEN, limit)) - reserve) // queued
    return max(wanted, min(config.max_sp_degree, share))
