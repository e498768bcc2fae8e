"""The JSON bodies the gateway returns, shaped as OpenAI's (completions and chat completions,
whole and as stream chunks) and the server-sent-event framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.generation import Outcome


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as "[DONE]")."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(outcome: Outcome) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class Shape:
    """The response shapes of one endpoint for one request."""

    is_chat: bool  # chat.completion(.chunk) with messages/deltas, else text_completion
    id: str  # "chatcmpl-<request id>" or "cmpl-<request id>"
    created_s: int  # Unix time of the request
    model: str

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.is_chat else None
        return {
            "id": self.id,
            "object": kind or "text_completion",
            "created": self.created_s,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, outcome: Outcome) -> dict[str, Any]:
        """The non-streamed response."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = outcome.finish_reason
        return {**self._envelope(False, [choice]), "usage": usage(outcome)}

    def delta(self, text: str, *, first: bool = False) -> dict[str, Any]:
        """A stream chunk carrying `text` (the chat stream's first chunk also names the role)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
        if self.is_chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return self._envelope(True, [choice])

    def finish(self, outcome: Outcome) -> dict[str, Any]:
        """The stream chunk with the finish reason."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.is_chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice["finish_reason"] = outcome.finish_reason
        return self._envelope(True, [choice])

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        """The last stream chunk when `stream_options.include_usage`: no choices, the usage."""
        return {**self._envelope(True, []), "usage": usage(outcome)}
