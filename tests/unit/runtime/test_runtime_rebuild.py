"""The runtime over the in-memory repository: group commit, recovery, rebuild after DB errors."""

from __future__ import annotations

import asyncio

import pytest
from waiting import eventually

from controlplane.config import Config
from controlplane.core.policies.registry import make_policy
from controlplane.core.types import RequestClass, RequestSpec, RequestState
from controlplane.runtime.clock import SystemClock
from controlplane.runtime.inputs import PendingSubmit
from controlplane.runtime.loop import Runtime
from controlplane.store.errors import Unavailable
from controlplane.store.memory import InMemoryRepository
from controlplane.store.records import NewRequest
from controlplane.telemetry import Telemetry


class FaultyRepository(InMemoryRepository):
    """The in-memory repository, made to fail `update_requests` or `add_requests` on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_updates = False
        self.fail_changes = False  # only updates that change a request (recovery's are empty)
        self.fail_adds = False
        self.num_failed_updates = 0

    def update_requests(self, views):  # type: ignore[no-untyped-def]
        if self.fail_updates or (self.fail_changes and views):
            self.num_failed_updates += 1
            raise Unavailable("database unavailable: disk full")
        super().update_requests(views)

    def add_requests(self, news):  # type: ignore[no-untyped-def]
        if self.fail_adds:
            raise Unavailable("database unavailable: disk full")
        return super().add_requests(news)


def _pending(i: int) -> PendingSubmit:
    spec = RequestSpec(f"r{i}", "t", 3, 2, 0, 1000.0 + i)
    return PendingSubmit(NewRequest(spec, RequestClass.SHORT, [1, 2, 3]), None)


def _runtime(repo: InMemoryRepository) -> Runtime:
    config = Config(tick_interval_s=0.02)
    return Runtime(config, make_policy("fifo"), repo, Telemetry.noop(), SystemClock())


async def test_submits_commit_together_and_recover_after_restart():
    # Prepare
    repo = FaultyRepository()
    runtime = _runtime(repo)
    await runtime.start()
    # Execute: many concurrent submits land in few transactions
    outcomes = await asyncio.gather(*(runtime.submit(_pending(i)) for i in range(50)))
    await runtime.stop()
    again = _runtime(repo)
    recovered = await again.start()
    # Assert
    assert all(o.created and o.view is not None for o in outcomes)
    assert len(repo.unfinished_with_inputs()) == 50 and recovered == 50
    assert again.policy.num_active_requests() == 50
    assert runtime.metrics.tick.counts  # ticks were measured
    ticks = sum(c[-1] for c in runtime.metrics.tick.counts.values())
    assert ticks < 50  # group commit: fewer transactions than submits
    await again.stop()


async def test_a_failed_tick_rolls_back_and_the_runtime_rebuilds_once_the_database_is_back():
    # Prepare
    repo = FaultyRepository()
    runtime = _runtime(repo)
    await runtime.start()
    await runtime.submit(_pending(0))
    repo.fail_updates = True
    # Execute: the cancel makes the tick update a request, which fails; so does every rebuild
    cancel = asyncio.ensure_future(runtime.cancel("r0", "test"))
    await eventually(lambda: repo.num_failed_updates >= 3, "the tick, then two rebuilds, failed")
    waited = not cancel.done()
    rolled_back = repo.get_request("r0").state
    repo.fail_updates = False
    view = await asyncio.wait_for(cancel, 10)
    # Assert
    assert waited and rolled_back is RequestState.QUEUED
    assert view.state is RequestState.CANCELLED
    assert runtime.serving and sum(runtime.metrics.rebuilds.values.values()) == 1
    later = await runtime.submit(_pending(1))
    assert later.created
    await runtime.stop()


async def test_a_submit_whose_tick_fails_twice_gets_unavailable_and_the_runtime_serves_on():
    # Prepare
    repo = FaultyRepository()
    runtime = _runtime(repo)
    await runtime.start()
    repo.fail_adds = True
    # Execute
    with pytest.raises(Unavailable):
        await asyncio.wait_for(runtime.submit(_pending(0)), 10)
    repo.fail_adds = False
    await asyncio.wait_for(runtime.until_serving(), 30)
    again = await runtime.submit(_pending(1))
    # Assert
    assert again.created and repo.get_request("r1").state is RequestState.QUEUED
    with pytest.raises(Exception, match="not found"):
        repo.get_request("r0")
    await runtime.stop()


async def test_a_cancel_whose_tick_fails_after_every_rebuild_fails_instead_of_looping():
    # Prepare
    repo = FaultyRepository()
    runtime = _runtime(repo)
    await runtime.start()
    await runtime.submit(_pending(0))
    repo.fail_changes = True
    # Execute
    with pytest.raises(Unavailable):
        await asyncio.wait_for(runtime.cancel("r0", "test"), 10)
    repo.fail_changes = False
    await asyncio.wait_for(runtime.until_serving(), 30)
    # Assert
    assert sum(runtime.metrics.rebuilds.values.values()) == 2
    assert repo.get_request("r0").state is RequestState.QUEUED
    view = await runtime.cancel("r0", "test")
    assert view.state is RequestState.CANCELLED
    await runtime.stop()
