"""Drive a live cluster with a workload through the asyncio SDK and measure every request.

`replay_workload` submits each request at its (scaled) arrival time, waits for all of them to
end (or for a deadline), then reads each request's lifecycle timestamps with `Get`. A Watch
stream sampled alongside gives the cluster-wide counters (preemptions, colocations, KV
transfers) and the instances' busy time. Times are the control plane's clock (epoch seconds),
so the queueing delay, TTFT and JCT are measured exactly where the simulator measures them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sdk.aio import AsyncClient
from sdk.errors import PecSchedError, PermissionDeniedError
from sdk.types import ClusterSnapshot, RequestClass, RequestInfo, RequestState, Sampling

SAMPLE_INTERVAL_S = 0.5  # Watch period used to sample counters and busy instances


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request to send: when (seconds after the replay starts) and what."""

    offset_s: float  # submit this long after the replay's start
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Measured:
    """What the control plane recorded for one replayed request (epoch seconds, NaN = never)."""

    request_id: str
    is_long: bool  # the control plane classified it LONG
    state: RequestState
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    first_scheduled_s: float
    prefill_done_s: float
    first_token_s: float
    finished_s: float
    preemptions: int
    error: str


@dataclass(frozen=True, slots=True)
class ClusterCounters:
    """Cluster-wide counters over the replay, from Watch snapshots (Watch needs an admin key)."""

    is_available: bool  # False: no snapshot (Watch refused); every other field is then 0
    num_gpus: int  # sum of the instances' tp in the last snapshot
    busy_gpu_s: float  # sampled: GPU-seconds of instances holding at least one request
    preemptions: int  # increase of the cluster's preemption counter during the replay
    colocations: int  # increase of the colocation counter
    kv_transfers: int  # increase of the KV-transfer counter
    last_at_s: float  # the control plane's clock at the last snapshot (epoch seconds)


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """Every measured request plus the cluster counters and the wall time of the run."""

    requests: tuple[Measured, ...]
    counters: ClusterCounters
    num_submit_errors: int  # requests the control plane refused (not in `requests`)
    first_submit_error: str  # the first refusal's message, "" when none
    wall_s: float  # from the first submit to the last request's end (or the deadline)


def _epoch(when: datetime | None) -> float:
    return float("nan") if when is None else when.timestamp()


def measured_from_info(info: RequestInfo) -> Measured:
    """The metric-relevant fields of a `Get` reply."""
    t = info.timestamps
    return Measured(
        request_id=info.request_id,
        is_long=info.request_class is RequestClass.LONG,
        state=info.state,
        prompt_tokens=info.prompt_tokens,
        output_tokens=info.output_tokens,
        arrival_s=_epoch(t.arrival),
        first_scheduled_s=_epoch(t.first_scheduled),
        prefill_done_s=_epoch(t.prefill_done),
        first_token_s=_epoch(t.first_token),
        finished_s=_epoch(t.finished),
        preemptions=info.preemptions,
        error=info.error,
    )


class _Sampler:
    """Accumulates Watch snapshots: counters at the first and last one, busy GPU-seconds."""

    def __init__(self) -> None:
        self.first: ClusterSnapshot | None = None
        self.last: ClusterSnapshot | None = None
        self.busy_gpu_s = 0.0
        self._last_mono: float | None = None

    def add(self, snapshot: ClusterSnapshot) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = snapshot
        if self._last_mono is not None and self.last is not None:
            # The busy set of the previous snapshot held until this one.
            busy = sum(i.tp for i in self.last.instances if i.request_ids)
            self.busy_gpu_s += busy * (now - self._last_mono)
        self.last, self._last_mono = snapshot, now

    def counters(self) -> ClusterCounters:
        first, last = self.first, self.last
        if first is None or last is None:
            return ClusterCounters(False, 0, 0.0, 0, 0, 0, time.time())
        return ClusterCounters(
            is_available=True,
            num_gpus=sum(i.tp for i in last.instances),
            busy_gpu_s=self.busy_gpu_s,
            preemptions=last.num_preemptions_total - first.num_preemptions_total,
            colocations=last.num_colocations_total - first.num_colocations_total,
            kv_transfers=last.num_kv_transfers_total - first.num_kv_transfers_total,
            last_at_s=last.at.timestamp() if last.at is not None else time.time(),
        )


async def _watch(client: AsyncClient, sampler: _Sampler) -> None:
    try:
        async for snapshot in client.watch(interval_s=SAMPLE_INTERVAL_S):
            sampler.add(snapshot)
    except PermissionDeniedError:
        return  # a client key: no counters


async def first_snapshot(client: AsyncClient, timeout_s: float) -> ClusterSnapshot | None:
    """The first Watch snapshot (the cluster's instances and counters now); None when the API
    key may not Watch (a client key)."""
    try:
        async with asyncio.timeout(timeout_s):
            async for snapshot in client.watch(interval_s=SAMPLE_INTERVAL_S):
                return snapshot
    except PermissionDeniedError:
        return None
    raise PecSchedError("UNAVAILABLE", "Watch ended before the first snapshot")


async def replay_workload(
    client: AsyncClient,
    plan: Sequence[PlannedRequest],
    *,
    drain_timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayOutcome:
    """Submit `plan` at its offsets, wait for every request to end, and measure each one.

    Args:
        client: an open client of the cluster.
        plan: requests sorted by `offset_s`.
        drain_timeout_s: after the last submit, wait at most this long for requests to end;
            requests still running then are measured as they are (unfinished).
        on_progress: called with (requests ended, requests submitted) as requests end.

    Returns: the measurements; refused submits are counted, not measured. Nothing is cancelled.
    """
    sampler = _Sampler()
    watcher = asyncio.create_task(_watch(client, sampler))
    try:
        # Let the first snapshot arrive so the counters start before the first submit.
        for _ in range(100):
            if sampler.first is not None:
                break
            await asyncio.sleep(0.02)
        ids, errors, wall_s = await _submit_all(client, plan, drain_timeout_s, on_progress)
        infos = await asyncio.gather(*(client.get(i) for i in ids))
        # One more snapshot interval so the counters include the last requests' events.
        await asyncio.sleep(SAMPLE_INTERVAL_S * 2)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return ReplayOutcome(
        requests=tuple(measured_from_info(info) for info in infos),
        counters=sampler.counters(),
        num_submit_errors=len(errors),
        first_submit_error=errors[0] if errors else "",
        wall_s=wall_s,
    )


async def _submit_all(
    client: AsyncClient,
    plan: Sequence[PlannedRequest],
    drain_timeout_s: float,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[list[str], list[str], float]:
    """Submit `plan` at its offsets and wait for the requests to end (see `replay_workload`).

    Returns (ids of the accepted requests in plan order, refusal messages in arrival order,
    seconds from the start to the end of the wait). Requests still running at the deadline are
    left running; only the local tasks waiting on them are cancelled.
    """
    started = time.monotonic()
    ids: list[str | None] = [None] * len(plan)
    errors: list[str] = []
    num_ended = 0

    async def one(index: int, item: PlannedRequest) -> None:
        nonlocal num_ended
        await asyncio.sleep(max(0.0, started + item.offset_s - time.monotonic()))
        try:
            ack = await client.submit(
                item.prompt_token_ids,
                max_new_tokens=item.max_new_tokens,
                sampling=Sampling(stop_at_eos=False),
            )
        except PecSchedError as exc:
            errors.append(f"{exc}")
            return
        ids[index] = ack.request_id
        try:
            await client.result(ack.request_id)
        except PecSchedError:
            pass  # measured by Get below, whatever happened
        num_ended += 1
        if on_progress is not None:
            on_progress(num_ended, sum(1 for i in ids if i is not None))

    tasks = [asyncio.create_task(one(i, item)) for i, item in enumerate(plan)]
    last_offset_s = plan[-1].offset_s if plan else 0.0
    _, pending = await asyncio.wait(
        tasks, timeout=max(0.0, started + last_offset_s - time.monotonic()) + drain_timeout_s
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall_s = time.monotonic() - started
    return [i for i in ids if i is not None], errors, wall_s
