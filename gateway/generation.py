"""One OpenAI generation over the SDK: submit, stream text, stop strings, finish, cancel.

`Generation.start` submits (control-plane errors surface here, before any HTTP body is sent);
iterating it yields text deltas and ends with an `Outcome`. Stop strings are matched on the
decoded text: the text before the first match is sent, the request is cancelled, and the finish
reason is "stop"; text that could still begin a stop string is held back until it cannot. The
finish reason is "length" when `max_tokens` tokens came out, else "stop" (an end-of-sequence
token). If the caller goes away (the iteration is closed or cancelled before the end), the
request is cancelled on the control plane.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sdk.aio import AsyncClient
from sdk.errors import PecSchedError
from sdk.types import Prompt, RequestState, Sampling

# Cancels sent on behalf of callers that went away; held so the tasks are not collected early.
_BACKGROUND: set[asyncio.Task[object]] = set()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens generated (up to the chunk holding a stop string)


class GenerationFailed(Exception):
    """The request failed or was cancelled on the cluster after it was accepted."""


class StopMatcher:
    """Finds the first stop string in streamed text; holds back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self._hold_chars = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was found; nothing after it is sent)."""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = min(self._hold_chars, len(buffer))
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the output."""
        held, self._held = self._held, ""
        return held


class Generation:
    """A submitted request whose output is read as text deltas and one final Outcome."""

    def __init__(
        self, client: AsyncClient, request_id: str, prompt_tokens: int, max_tokens: int
    ) -> None:
        self.client = client
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens

    @classmethod
    async def start(
        cls, client: AsyncClient, prompt: Prompt, max_tokens: int, sampling: Sampling
    ) -> Generation:
        """Submit; raises the SDK's errors (PecSchedError) when the control plane refuses."""
        ack = await client.submit(prompt, max_new_tokens=max_tokens, sampling=sampling)
        return cls(client, ack.request_id, ack.prompt_tokens, max_tokens)

    async def events(self, stops: tuple[str, ...]) -> AsyncIterator[str | Outcome]:
        """Text deltas, then one Outcome; GenerationFailed if the request fails on the cluster."""
        matcher = StopMatcher(stops)
        num_tokens, ended = 0, False
        try:
            async for chunk in self.client.generate(self.request_id):
                num_tokens += len(chunk.token_ids)
                text, stopped = matcher.feed(chunk.text)
                if text:
                    yield text
                if stopped:
                    ended = True
                    self._cancel_in_background()
                    yield Outcome("stop", self.prompt_tokens, num_tokens)
                    return
                if chunk.final_state is not None:
                    ended = True
                    if chunk.final_state is not RequestState.FINISHED:
                        raise GenerationFailed(
                            f"request {self.request_id} {chunk.final_state.value}: {chunk.error}"
                        )
                    if held := matcher.flush():
                        yield held
                    reason = "length" if num_tokens >= self.max_tokens else "stop"
                    yield Outcome(reason, self.prompt_tokens, num_tokens)
                    return
        finally:
            if not ended:
                self._cancel_in_background()

    def _cancel_in_background(self) -> None:
        # Also when the caller's task is being cancelled or closed: a new task sends the Cancel.
        async def cancel() -> object:
            try:
                return await self.client.cancel(self.request_id)
            except PecSchedError:
                return None  # already gone, or the control plane is down: nothing to free

        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(cancel())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
