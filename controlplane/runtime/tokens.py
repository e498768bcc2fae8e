"""Per-request output token logs shared by the tick thread (writer) and the event loop (readers).

The tick thread appends tokens to `ids` inside its transaction; the event loop advances
`committed` after the commit and wakes the readers. Readers only look at `ids[:committed]`, so
Generate streams never see a token that is not durable. Ticks run one at a time and the loop
publishes between ticks, so `committed` is exact when it is set. When the runtime rebuilds
its state from the database, every log is `retire`d: readers wake and switch to the request's
new log (or to the store), and nothing past `committed` is ever shown.
"""

from __future__ import annotations

import asyncio

from controlplane.core.types import RequestState


class TokenLog:
    """Output tokens of one unfinished request, plus its final state once it has one."""

    __slots__ = (
        "_changed",
        "committed",
        "error",
        "final_state",
        "ids",
        "max_new_tokens",
        "retired",
    )

    def __init__(self, ids: list[int], max_new_tokens: int) -> None:
        self.ids = ids  # every token received so far (append-only; tick thread)
        self.max_new_tokens = max_new_tokens  # tokens beyond this are never stored
        self.committed = len(ids)  # ids[:committed] are durable (event loop)
        self.final_state: RequestState | None = None  # set once terminal (event loop)
        self.error = ""  # why it failed/was cancelled
        self.retired = False  # replaced by a rebuilt runtime's log (event loop)
        self._changed: asyncio.Event | None = None

    def accept(self, start_index: int, token_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Append the part of `token_ids` (at `start_index`) not yet known; returns it.

        Tokens already known are skipped (agents may repeat them after a re-queue or resume);
        a chunk that starts past the end (a gap) is refused: returns () and stores nothing.
        """
        have = len(self.ids)
        if start_index > have:
            return ()
        room = self.max_new_tokens - have
        new = token_ids[have - start_index :][: max(0, room)]
        self.ids.extend(new)
        return new

    def changed(self) -> asyncio.Event:
        """An event set at the next publish (call from the event loop)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def retire(self) -> None:
        """Mark this log replaced and wake readers, leaving `committed` as it is."""
        self.retired = True
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def publish(self) -> None:
        """Mark every token durable and wake readers (event loop, after a commit)."""
        self.committed = len(self.ids)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
