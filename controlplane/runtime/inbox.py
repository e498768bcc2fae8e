"""`Inbox`: what the next tick applies besides submits (event loop only).

Agent reports, membership changes (joins, leaves) and cancels, in the order they arrived (the
tick applies them in that order), and the heartbeats to persist: any message of an agent
proves it alive, persisted at most once per heartbeat period per node.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.runtime.inputs import CancelAsk, Happening


class Inbox:
    """Happenings and heartbeats waiting for the next tick; see the module docstring."""

    def __init__(self, heartbeat_interval_s: float) -> None:
        self._heartbeat_interval_s = heartbeat_interval_s
        self.happenings: list[Happening] = []
        self._heartbeats: dict[str, float] = {}  # node -> last message time, to persist
        self._touched_at: dict[str, float] = {}  # node -> when its heartbeat was last persisted

    def add(self, happening: Happening) -> None:
        """Queue a happening for the next tick."""
        self.happenings.append(happening)

    def heard_from(self, node_id: str, now_s: float) -> None:
        """A message of `node_id` arrived at `now_s`."""
        if now_s - self._touched_at.get(node_id, 0.0) >= self._heartbeat_interval_s:
            self._touched_at[node_id] = now_s
            self._heartbeats[node_id] = now_s

    def take(self) -> tuple[list[Happening], dict[str, float]]:
        """Everything waiting: the happenings in order, and node -> heartbeat to persist."""
        taken = self.happenings, self._heartbeats
        self.happenings, self._heartbeats = [], {}
        return taken

    def keep_only_cancels(self) -> None:
        """Drop everything but cancels (the runtime rebuilds: agents register again)."""
        self.happenings = [h for h in self.happenings if isinstance(h, CancelAsk)]
        self._heartbeats.clear()
        self._touched_at.clear()

    def put_back(self, happenings: Iterable[Happening]) -> None:
        """Queue happenings of a failed tick again, ahead of the rest."""
        self.happenings[:0] = list(happenings)
