"""`Inbox`: happenings in arrival order, heartbeats persisted once per period, only cancels
kept across a rebuild."""

from __future__ import annotations

from controlplane.runtime.inbox import Inbox
from controlplane.runtime.inputs import CancelAsk, NodeLeave


def test_heartbeats_are_kept_once_per_period_and_happenings_in_order():
    # Prepare
    inbox = Inbox(heartbeat_interval_s=1.0)
    leave = NodeLeave("n1", ("i1",), "gone")

    # Execute
    inbox.add(CancelAsk("r1", "no"))
    inbox.add(leave)
    for at_s in (10.0, 10.5, 11.2):
        inbox.heard_from("n2", at_s)
    happenings, heartbeats = inbox.take()
    inbox.heard_from("n2", 11.5)  # within the period of the one kept at 11.2

    # Assert
    assert happenings == [CancelAsk("r1", "no"), leave]
    assert heartbeats == {"n2": 11.2}
    assert inbox.take() == ([], {})


def test_a_rebuild_keeps_only_the_cancels_and_a_failed_ticks_cancels_go_first():
    # Prepare
    inbox = Inbox(heartbeat_interval_s=1.0)
    inbox.add(NodeLeave("n1", ("i1",), "gone"))
    inbox.add(CancelAsk("r2", "no"))
    inbox.heard_from("n1", 5.0)

    # Execute
    inbox.keep_only_cancels()
    inbox.put_back([CancelAsk("r1", "first")])
    inbox.heard_from("n1", 5.1)  # the period starts over after a rebuild

    # Assert
    assert inbox.take() == ([CancelAsk("r1", "first"), CancelAsk("r2", "no")], {"n1": 5.1})
