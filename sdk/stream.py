"""Token-stream resumption, shared by the sync and asyncio clients.

A `TokenCursor` remembers how many tokens of one request the caller has received. When a
Generate stream breaks (UNAVAILABLE, or the server closes it before the final chunk), the client
opens a new one with `from_token_index = cursor.next_index`; whatever the server sends again is
trimmed here, so the caller sees every token exactly once and in order.
"""

from __future__ import annotations

from protos.pecsched.v1 import inference_pb2
from sdk.convert import token_chunk_from_proto
from sdk.errors import ProtocolError, UnavailableError
from sdk.types import GenerateResult, RequestState, TokenChunk


class TokenCursor:
    """Position in one request's output; turns wire chunks into exactly-once SDK chunks."""

    def __init__(self, request_id: str, from_token_index: int = 0) -> None:
        """Start at `from_token_index` (0 = the first output token)."""
        if not request_id:
            raise ValueError("request_id must not be empty")
        if from_token_index < 0:
            raise ValueError(f"from_token_index must be >= 0, got {from_token_index}")
        self.request_id = request_id
        self.next_index = from_token_index  # index of the next token the caller has not seen
        self.final_state: RequestState | None = None  # set once the last chunk arrived

    def generate_request(self) -> inference_pb2.GenerateRequest:
        """The GenerateRequest that (re)opens the stream at the cursor."""
        return inference_pb2.GenerateRequest(
            request_id=self.request_id, from_token_index=self.next_index
        )

    def accept(self, message: inference_pb2.TokenChunk) -> TokenChunk | None:
        """The part of `message` the caller has not seen, or None when nothing is new.

        Tokens before `next_index` (re-sent after a resume) are dropped. When a chunk is cut
        inside, its `text` is dropped too, because it cannot be split by token; token ids are
        authoritative. A chunk that starts past `next_index` raises ProtocolError: the server
        skipped tokens.
        """
        chunk = token_chunk_from_proto(message)
        if chunk.start_index > self.next_index:
            raise ProtocolError(
                f"token stream of {self.request_id} jumped from index {self.next_index} "
                f"to {chunk.start_index}"
            )
        num_seen = self.next_index - chunk.start_index
        new_ids = chunk.token_ids[num_seen:]
        self.next_index += len(new_ids)
        if chunk.final_state is not None:
            self.final_state = chunk.final_state
        if not new_ids and chunk.final_state is None:
            return None
        return TokenChunk(
            request_id=chunk.request_id or self.request_id,
            start_index=self.next_index - len(new_ids),
            token_ids=new_ids,
            text=chunk.text if num_seen == 0 else "",
            final_state=chunk.final_state,
            error=chunk.error,
        )

    def ended_early(self) -> UnavailableError:
        """The error for a stream that closed cleanly before its final chunk (then resumed)."""
        return UnavailableError(
            "UNAVAILABLE",
            f"token stream of {self.request_id} ended at index {self.next_index} "
            "before the final chunk",
        )


class ResultCollector:
    """Concatenates the chunks of one request into a GenerateResult."""

    def __init__(self, request_id: str) -> None:
        """Collect the output of `request_id`."""
        self._request_id = request_id
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._state = RequestState.UNSPECIFIED
        self._error = ""

    def add(self, chunk: TokenChunk) -> None:
        """Append one chunk (chunks arrive in order, as `TokenCursor` yields them)."""
        self._token_ids.extend(chunk.token_ids)
        self._texts.append(chunk.text)
        if chunk.final_state is not None:
            self._state = chunk.final_state
            self._error = chunk.error

    def result(self) -> GenerateResult:
        """The collected output; `state` is UNSPECIFIED if no final chunk was added."""
        return GenerateResult(
            request_id=self._request_id,
            token_ids=tuple(self._token_ids),
            text="".join(self._texts),
            state=self._state,
            error=self._error,
        )
