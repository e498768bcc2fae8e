"""AttachLink's life cycle without a control plane."""

from __future__ import annotations

import queue
from typing import Any

from dataplane.agent.link import AttachLink


def test_close_before_start_returns_and_a_later_start_does_nothing() -> None:
    # Prepare: an agent whose workers never became ready closes its link unstarted
    inbox: queue.Queue[Any] = queue.Queue()
    link = AttachLink("127.0.0.1:1", None, inbox, max_backoff_s=1.0)
    # Execute
    link.close()
    link.start()
    link.close()
    # Assert: no error, nothing posted, no connection attempt left running
    assert inbox.empty()
    assert not link._thread.is_alive()
