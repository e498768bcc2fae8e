"""`Waiters`: a failed tick's callers wait for one more tick; a second failure reaches them."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.core.types import RequestClass, RequestSpec
from controlplane.runtime.inputs import PendingSubmit, SubmitOutcome
from controlplane.runtime.waiters import Waiters
from controlplane.store.records import NewRequest


def _pending(request_id: str) -> PendingSubmit:
    spec = RequestSpec(request_id, "t", 1, 1, 0, 0.0)
    return PendingSubmit(NewRequest(spec, RequestClass.SHORT, [1]), None)


async def test_a_waiter_is_put_back_once_then_gets_the_error():
    # Prepare: a submit and a cancel taken by a tick
    waiters = Waiters()
    submitted = waiters.submit(_pending("r1"))
    cancelled = waiters.cancel("r0")
    error = RuntimeError("database away")

    # Execute: the tick fails; so does the next one
    first = waiters.put_back(waiters.take(max_submits=10), error)
    second = waiters.put_back(waiters.take(max_submits=10), error)

    # Assert
    assert [p.new.spec.request_id for p, _ in first.submits] == ["r1"]
    assert [rid for rid, _ in first.cancels] == ["r0"]
    assert second.submits == [] and second.cancels == []
    with pytest.raises(RuntimeError, match="database away"):
        await submitted
    with pytest.raises(RuntimeError, match="database away"):
        await cancelled


async def test_a_put_back_waiter_gets_the_next_ticks_answer_and_the_rest_fail_at_stop():
    # Prepare: a submit put back once by a failed tick
    waiters = Waiters()
    submitted = waiters.submit(_pending("r1"))
    waiters.put_back(waiters.take(max_submits=10), RuntimeError("away"))
    outcome = SubmitOutcome(None, False, "too long")

    # Execute
    waiters.answer(waiters.take(max_submits=10), [outcome], {}, None)
    snapshot = waiters.snapshot()
    waiters.fail_all(RuntimeError("stopping"))

    # Assert
    assert await submitted is outcome
    with pytest.raises(RuntimeError, match="stopping"):
        await asyncio.wait_for(snapshot, 1)
