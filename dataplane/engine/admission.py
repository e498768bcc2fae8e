"""Admission and control of resident requests: the `Engine`'s calls that change no KV row.

`EngineAdmission.add_request` admits a request, reserving every KV row it will ever write (one
movable range; the pool may compact to make it fit); the `can_fit*` / `largest_fit_kv_tokens`
questions answer, without side effects, whether such a reservation would succeed now. `pause` /
`resume` move a request out of and back into scheduling without touching its KV; the
remaining calls read the request table. Every call here runs between iterations (at a chunk
boundary): none runs the model.
"""

from __future__ import annotations

from dataplane.engine.base import EngineBase, kv_rows
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState, RunningRequest
from dataplane.engine.types import SamplingParams


class EngineAdmission(EngineBase):
    """Admitting, pausing and resuming requests; questions on capacity and the request table."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        chunk_tokens: int | None = None,
        hold_after_prefill: bool = False,
        batch_tokens: int | None = None,
    ) -> None:
        """Admit a request and reserve all its KV rows now; raises EngineError if it can't fit.

        `hold_after_prefill` keeps the request HELD after its first token (KV resident, not
        decoded) so it can be exported to a decode worker. `batch_tokens`: while it prefills,
        no iteration runs more tokens than this in all (decodes included; see `step`).
        """
        self._check_new(request_id, prompt_token_ids, sampling)
        chunk = self.config.chunk_tokens if chunk_tokens is None else chunk_tokens
        if chunk < 1:
            raise EngineError(EngineErrorCode.INVALID_ARGUMENT, f"chunk_tokens={chunk} < 1")
        if batch_tokens is not None and batch_tokens < 1:
            raise EngineError(EngineErrorCode.INVALID_ARGUMENT, f"batch_tokens={batch_tokens} < 1")
        rows = self.kv.reserve_movable(request_id, kv_rows(len(prompt_token_ids), sampling))
        self._requests[request_id] = RunningRequest.new(
            request_id,
            prompt_token_ids,
            sampling,
            kv_range=rows,
            chunk_tokens=chunk,
            hold_after_prefill=hold_after_prefill,
            device=self.device,
            batch_tokens=batch_tokens,
        )

    def can_fit(self, num_prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request of this size would be admitted now (compaction included)."""
        rows = num_prompt_tokens + max_new_tokens - 1
        return num_prompt_tokens + max_new_tokens <= self.max_model_tokens and self.kv.can_fit(rows)

    def can_fit_kv_tokens(self, num_kv_tokens: int) -> bool:
        """Whether `num_kv_tokens` KV rows (prompt + max_new_tokens - 1) can be reserved now."""
        return self.kv.can_fit(num_kv_tokens)

    @property
    def largest_fit_kv_tokens(self) -> int:
        """The most KV rows one new request can reserve now, counting compaction.

        Plan with this, not `num_free_kv_tokens`: rows pinned by in-flight transfers (and SP
        caches) can keep part of the free total unusable.
        """
        return self.kv.largest_fit_tokens

    def _check_new(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        self._check_new_counts(request_id, len(prompt), sampling)
        self._check_prompt_ids(prompt)

    def pause(self, request_id: str) -> None:
        """Stop scheduling a PREFILLING/DECODING/HELD request; its KV stays resident."""
        req = self._get(request_id)
        if req.state not in (RequestState.PREFILLING, RequestState.DECODING, RequestState.HELD):
            raise EngineError(
                EngineErrorCode.INVALID_STATE, f"cannot pause {request_id!r} in {req.state.name}"
            )
        req.paused_from, req.state = req.state, RequestState.PAUSED

    def resume(self, request_id: str, *, chunk_tokens: int | None = None) -> None:
        """Continue a PAUSED request where it stopped (nothing is recomputed); HELD -> DECODING.

        `chunk_tokens` changes the prefill chunk size for the rest of the prompt.
        """
        req = self._get(request_id)
        if chunk_tokens is not None:
            if chunk_tokens < 1:
                raise EngineError(
                    EngineErrorCode.INVALID_ARGUMENT, f"chunk_tokens={chunk_tokens} < 1"
                )
            req.chunk_tokens = chunk_tokens
        if req.state is RequestState.HELD:
            req.state = RequestState.DECODING
        elif req.state is RequestState.PAUSED and req.paused_from is not None:
            req.state, req.paused_from = req.paused_from, None
        else:
            raise EngineError(
                EngineErrorCode.INVALID_STATE, f"cannot resume {request_id!r} in {req.state.name}"
            )

    def request_state(self, request_id: str) -> RequestState:
        """The state of a resident request."""
        return self._get(request_id).state

    @property
    def num_requests(self) -> int:
        """Resident requests (any state)."""
        return len(self._requests)

    @property
    def num_free_kv_tokens(self) -> int:
        """Free KV rows in total."""
        return self.kv.allocator.num_free_tokens

    def has_runnable_work(self) -> bool:
        """Whether `step()` would run anything."""
        runnable = (RequestState.PREFILLING, RequestState.DECODING)
        return any(r.state in runnable for r in self._requests.values())
