"""One worker's engine: admission, the iteration loop, pause/resume/cancel, KV export/import.

Life of a request::

    add_request ──▶ PREFILLING ──(last chunk)──▶ DECODING ──(EOS / max_new_tokens)──▶ finished
                       │  ▲                         │  ▲        (hold_after_prefill: HELD)
                 pause │  │ resume            pause │  │ resume
                       ▼  │                         ▼  │
                      PAUSED (KV resident)         PAUSED
    begin_import ──▶ IMPORTING ──finish_import──▶ DECODING (or PREFILLING for a partial prefill)
    (begin_import = reserve_import, from the counts, + attach_import, the token ids: a copier
    can start filling the rows before the ids are decoded)
    cancel: any state ──▶ gone, its KV rows freed at once.

KV rows: each request owns one contiguous movable range of the pool (`KVRange`), reserved at
admission. When a new reservation fits the free total but no free extent, the pool is compacted
(`KVCache.compact`): unpinned ranges slide down and the engine reads each request's start anew every
step. Pinning rule: a request whose rows someone else may be reading or writing through views is
pinned and never moves: from `begin_import` (`reserve_import`) until `finish_import` (or cancel),
and from each `export_kv` until a matching `release_export` (or cancel / finish). Compaction runs
only inside admission calls (`add_request`, `begin_import`/`reserve_import`, and fixed
`KVCache.reserve` calls such as SP caches), never during `step()`. No other state caches offsets:
every step builds its attention batch, and the CUDA-graph input buffers are refilled, from the
current starts.

`step()` runs one iteration: one token for every DECODING request (up to `max_batch_seqs`; beyond
that they take turns round robin), then prefill chunks of PREFILLING requests in admission order,
each at most its chunk size, until the iteration's token budget is used: `max_batch_tokens`, or less
while a PREFILLING request admitted with `batch_tokens` asks for less (the smallest such; a mixed
prefill of the `sarathi` policy, whose per-iteration budget comes with the command). The budget
counts the decodes too, one token each. It returns the events of the iteration. All model work runs
inside `step()`, so every other call happens at a chunk boundary by construction. `num_iterations`
and `last_iteration_tokens` count the iterations run and the tokens of the latest one.

On CUDA, decodes use the Triton split-KV kernel where it runs (`split_kv_decode`), and
decode-only iterations replay CUDA graphs (`dataplane.engine.cuda_graphs`) when the decode
kernel is split-KV or flash varlen; everything else runs the eager forward.
"""

from __future__ import annotations

import torch

from dataplane.engine.config import AttentionKernel, EngineConfig, activation_reserve_bytes
from dataplane.engine.cuda_graphs import DecodeGraphs, capture_verified_graphs
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.kv_cache import KVCache, KVPlan, plan_pool_tokens
from dataplane.engine.requests import RequestState, RunningRequest
from dataplane.engine.sampling import sample_tokens
from dataplane.engine.types import (
    ChunkDone,
    EngineEvent,
    Finished,
    FinishReason,
    KVExport,
    KVImportTarget,
    KVMetadata,
    PrefillDone,
    SamplingParams,
    TokenGenerated,
)
from dataplane.models.attention import (
    CachedAttention,
    flash_varlen_works,
    make_attention_batch,
    split_kv_decode_works,
)
from dataplane.models.llama import LlamaForCausalLM

__all__ = ["AttentionKernel", "Engine", "EngineConfig", "KVImportTarget"]


class Engine:
    """Runs one model instance: see the module docstring for the request life cycle."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        shape = model.shape
        self.max_model_tokens = config.max_model_tokens or shape.max_position_tokens
        if shape.sliding_window_tokens is not None:
            self.max_model_tokens = min(self.max_model_tokens, shape.sliding_window_tokens)
        use_flash = config.attention_kernel != "sdpa" and flash_varlen_works(
            self.device, self.dtype
        )
        if config.attention_kernel == "flash-varlen" and not use_flash:
            raise EngineError(
                EngineErrorCode.INVALID_ARGUMENT,
                f"attention_kernel='flash-varlen' does not run on {self.device} in {self.dtype}",
            )
        self.kernel = AttentionKernel.FLASH_VARLEN if use_flash else AttentionKernel.SDPA
        self.split_kv_decode = config.split_kv_decode and split_kv_decode_works(
            self.device, self.dtype
        )
        self.kv_plan: KVPlan = plan_pool_tokens(
            bytes_per_token=shape.kv_bytes_per_token(self.dtype),
            device=self.device,
            kv_budget_bytes=config.kv_budget_bytes,
            activation_reserve_bytes=activation_reserve_bytes(shape, config, self.dtype),
            memory_fraction=config.memory_fraction,
        )
        self.kv = KVCache(
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            pool_tokens=self.kv_plan.pool_tokens,
            dtype=self.dtype,
            device=self.device,
        )
        self._requests: dict[str, RunningRequest] = {}
        self._decode_turn = 0  # round-robin offset when decodes exceed max_batch_seqs
        self.num_iterations = 0  # iterations run (step() calls that ran a forward)
        self.last_iteration_tokens = 0  # tokens of the latest iteration (decodes + chunks)
        self.graphs: DecodeGraphs | None = None
        self.graph_error: str | None = None  # why CUDA graphs are off, when they were wanted
        if config.cuda_graphs and (use_flash or self.split_kv_decode):
            scratch = self.kv.reserve("<graph scratch row>", 1)  # graph padding rows write here
            try:
                self.graphs = capture_verified_graphs(
                    model,
                    self.kv,
                    max_batch_seqs=min(config.max_batch_seqs, config.max_batch_tokens),
                    max_kv_tokens=self.max_model_tokens,
                    scratch_row=scratch,
                    kernels=self.attention_kernels,
                )
            except RuntimeError as exc:
                self.graph_error = str(exc)

    @property
    def attention_kernels(self) -> dict[str, bool]:
        """The kernel choices every `CachedAttention` of this engine is built with."""
        return {
            "use_flash_varlen": self.kernel is AttentionKernel.FLASH_VARLEN,
            "split_kv_decode": self.split_kv_decode,
        }

    # ----------------------------------------------------------------- admission
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
        rows = self.kv.reserve_movable(request_id, _kv_rows(len(prompt_token_ids), sampling))
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

    def _check_new_counts(
        self, request_id: str, num_prompt_tokens: int, sampling: SamplingParams
    ) -> None:
        if request_id in self._requests:
            raise EngineError(EngineErrorCode.INVALID_ARGUMENT, f"request_id {request_id!r} exists")
        if num_prompt_tokens < 1:
            raise EngineError(EngineErrorCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        total = num_prompt_tokens + sampling.max_new_tokens
        if total > self.max_model_tokens:
            # The model's limit, not capacity: no instance of this model can run it.
            raise EngineError(
                EngineErrorCode.INVALID_ARGUMENT,
                f"request {request_id!r}: prompt {num_prompt_tokens} + max_new_tokens "
                f"{sampling.max_new_tokens} exceeds the model limit of {self.max_model_tokens}",
            )

    def _check_prompt_ids(self, prompt: list[int]) -> None:
        vocab = self.model.shape.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError(
                EngineErrorCode.INVALID_ARGUMENT, f"prompt_token_ids must be in [0, {vocab})"
            )

    # ----------------------------------------------------------------- control
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

    def cancel(self, request_id: str) -> int:
        """Drop a request in any state and free its KV rows at once; returns the rows freed."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no request {request_id!r}")
        self.kv.release(req.kv_start)
        return req.kv_rows

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

    def _get(self, request_id: str) -> RunningRequest:
        req = self._requests.get(request_id)
        if req is None:
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no request {request_id!r}")
        return req

    # ----------------------------------------------------------------- iteration
    def step(self) -> list[EngineEvent]:
        """Run one iteration (decodes first, then prefill chunks) and return its events."""
        cfg = self.config
        decodes = [r for r in self._requests.values() if r.state is RequestState.DECODING]
        prefills = [r for r in self._requests.values() if r.state is RequestState.PREFILLING]
        budget = min([cfg.max_batch_tokens] + [r.batch_tokens for r in prefills if r.batch_tokens])
        cap = min(cfg.max_batch_seqs, budget)
        if len(decodes) > cap:  # more decodes than fit: take turns, round robin
            first = self._decode_turn % len(decodes)
            decodes = (decodes[first:] + decodes[:first])[:cap]
            self._decode_turn = first + cap
        budget -= len(decodes)
        chunks: list[tuple[RunningRequest, int]] = []
        for req in prefills:
            if budget <= 0 or len(decodes) + len(chunks) >= cfg.max_batch_seqs:
                break
            n = min(req.num_prompt_tokens - req.num_computed_tokens, req.chunk_tokens, budget)
            chunks.append((req, n))
            budget -= n
        if not decodes and not chunks:
            return []
        self.num_iterations += 1
        self.last_iteration_tokens = len(decodes) + sum(n for _, n in chunks)
        return self._run(decodes, chunks)

    def _run(
        self, decodes: list[RunningRequest], chunks: list[tuple[RunningRequest, int]]
    ) -> list[EngineEvent]:
        ids = [r.output_token_ids[-1] for r in decodes]
        pos = [r.num_computed_tokens for r in decodes]
        id_parts, pos_parts = [torch.tensor(ids, dtype=torch.int64)], [torch.tensor(pos)]
        num_new, num_kv = [1] * len(decodes), [p + 1 for p in pos]
        starts = [r.kv_start for r in decodes]
        logits_rows = list(range(len(decodes)))
        row = len(decodes)
        for req, n in chunks:
            done = req.num_computed_tokens
            id_parts.append(req.prompt_tensor[done : done + n])
            pos_parts.append(torch.arange(done, done + n))
            num_new.append(n)
            num_kv.append(done + n)
            starts.append(req.kv_start)
            row += n
            if done + n == req.num_prompt_tokens:
                logits_rows.append(row - 1)
        with torch.inference_mode():
            if (
                not chunks
                and self.graphs is not None
                and len(decodes) <= self.graphs.max_batch_seqs
            ):
                logits = self.graphs.run(ids, pos, starts, num_kv)
            else:
                logits = self._forward(id_parts, pos_parts, num_new, num_kv, starts, logits_rows)
            finishing = [r for r, n in chunks if r.num_computed_tokens + n == r.num_prompt_tokens]
            sampled = decodes + finishing
            tokens = sample_tokens(
                logits, [r.sampling for r in sampled], [r.generator for r in sampled]
            )
        events: list[EngineEvent] = []
        for req in decodes:
            req.num_computed_tokens += 1
        for req, n in chunks:
            req.num_computed_tokens += n
            events.append(
                ChunkDone(req.request_id, n, req.num_computed_tokens, req.num_prompt_tokens)
            )
            if req.num_computed_tokens == req.num_prompt_tokens:
                events.append(PrefillDone(req.request_id, req.num_prompt_tokens))
                req.state = RequestState.HELD if req.hold_after_prefill else RequestState.DECODING
        for req, token in zip(sampled, tokens, strict=True):
            events.extend(self._append_token(req, token))
        return events

    def _forward(
        self,
        id_parts: list[torch.Tensor],
        pos_parts: list[torch.Tensor],
        num_new: list[int],
        num_kv: list[int],
        starts: list[int],
        logits_rows: list[int],
    ) -> torch.Tensor:
        """The eager forward of one iteration; logits (len(logits_rows), vocab) float32."""
        device = self.device
        batch = make_attention_batch(num_new, num_kv, starts, device)
        attend = CachedAttention(self.kv.k_pools, self.kv.v_pools, batch, **self.attention_kernels)
        logits: torch.Tensor = self.model(
            torch.cat(id_parts).to(device, non_blocking=True),
            torch.cat(pos_parts).to(device, non_blocking=True),
            attend,
            torch.tensor(logits_rows, dtype=torch.int64).to(device, non_blocking=True),
        )
        return logits

    def _append_token(self, req: RunningRequest, token: int) -> list[EngineEvent]:
        req.output_token_ids.append(token)
        events: list[EngineEvent] = [
            TokenGenerated(req.request_id, token, len(req.output_token_ids))
        ]
        reason = None
        if token in req.sampling.eos_token_ids:
            reason = FinishReason.EOS
        elif len(req.output_token_ids) >= req.sampling.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.cancel(req.request_id)
            events.append(Finished(req.request_id, reason, tuple(req.output_token_ids)))
        return events

    # ----------------------------------------------------------------- KV export/import
    def export_kv(self, request_id: str) -> KVExport:
        """Metadata + per-layer views of the request's valid KV rows (see KVExport).

        Pins the request's rows (compaction will not move them) until `release_export` or the
        request ends; each call pins once.
        """
        req = self._get(request_id)
        if req.state is RequestState.IMPORTING:
            raise EngineError(EngineErrorCode.INVALID_STATE, f"{request_id!r} is still importing")
        req.kv_range.pins += 1
        n, start = req.num_computed_tokens, req.kv_start
        gen_state = None if req.generator is None else bytes(req.generator.get_state().tolist())
        shape = self.model.shape
        meta = KVMetadata(
            request_id=request_id,
            prompt_token_ids=tuple(req.prompt_token_ids),
            output_token_ids=tuple(req.output_token_ids),
            num_kv_tokens=n,
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=str(self.dtype),
            sampling=req.sampling,
            generator_state=gen_state,
        )
        keys = tuple(k[start : start + n] for k in self.kv.k_pools)
        values = tuple(v[start : start + n] for v in self.kv.v_pools)
        return KVExport(meta, keys, values)

    def release_export(self, request_id: str) -> None:
        """The views of one earlier `export_kv` are no longer used: compaction may move the rows
        again once every export is released. Not needed before cancel (that frees the rows)."""
        req = self._get(request_id)
        if req.kv_range.pins == 0 or req.state is RequestState.IMPORTING:
            raise EngineError(
                EngineErrorCode.INVALID_STATE, f"{request_id!r} has no outstanding export"
            )
        req.kv_range.pins -= 1

    def begin_import(self, meta: KVMetadata) -> KVImportTarget:
        """Reserve rows for an incoming request and return views to fill (e.g. by recv).

        The rows stay pinned (never moved by compaction) until `finish_import` or cancel.
        `reserve_import` then `attach_import`, for callers that have all the metadata at once.
        """
        target = self.reserve_import(meta, len(meta.prompt_token_ids), len(meta.output_token_ids))
        try:
            self.attach_import(meta)
        except EngineError:
            self.cancel(meta.request_id)
            raise
        return target

    def reserve_import(
        self, meta: KVMetadata, num_prompt_tokens: int, num_output_tokens: int
    ) -> KVImportTarget:
        """`begin_import` from the counts alone: `meta`'s token ids are not read (they may be
        empty), so the KV copy can start before they are decoded. The request is IMPORTING
        and cannot finish before `attach_import` gave it its token ids.
        """
        shape = self.model.shape
        layout = (meta.num_layers, meta.num_kv_heads, meta.head_dim, meta.dtype)
        mine = (shape.num_layers, shape.num_kv_heads, shape.head_dim, str(self.dtype))
        if layout != mine:
            raise EngineError(
                EngineErrorCode.KV_MISMATCH, f"KV layout {layout} != this engine's {mine}"
            )
        _check_import_counts(meta.num_kv_tokens, num_prompt_tokens, num_output_tokens)
        self._check_new_counts(meta.request_id, num_prompt_tokens, meta.sampling)
        rows = self.kv.reserve_movable(meta.request_id, _kv_rows(num_prompt_tokens, meta.sampling))
        req = RunningRequest.new(
            meta.request_id,
            [],  # attach_import sets the prompt
            meta.sampling,
            kv_range=rows,
            chunk_tokens=self.config.chunk_tokens,
            hold_after_prefill=False,
            device=self.device,
        )
        self._requests[meta.request_id] = req
        req.state, req.num_computed_tokens = RequestState.IMPORTING, meta.num_kv_tokens
        req.kv_range.pins += 1
        if req.generator is not None and meta.generator_state is not None:
            req.generator.set_state(torch.tensor(list(meta.generator_state), dtype=torch.uint8))
        n, start = meta.num_kv_tokens, req.kv_start
        keys = tuple(k[start : start + n] for k in self.kv.k_pools)
        values = tuple(v[start : start + n] for v in self.kv.v_pools)
        return KVImportTarget(meta.request_id, keys, values)

    def attach_import(self, meta: KVMetadata) -> None:
        """Give a request reserved by `reserve_import` its prompt and output token ids (once;
        they must match the reserved counts)."""
        req = self._get(meta.request_id)
        if req.state is not RequestState.IMPORTING or req.prompt_token_ids:
            raise EngineError(
                EngineErrorCode.INVALID_STATE, f"{meta.request_id!r} awaits no token ids"
            )
        prompt, output = list(meta.prompt_token_ids), list(meta.output_token_ids)
        if _kv_rows(len(prompt), req.sampling) != req.kv_rows:
            raise EngineError(
                EngineErrorCode.INVALID_ARGUMENT,
                f"{len(prompt)} prompt token ids for rows reserved for another prompt length",
            )
        _check_import_counts(req.num_computed_tokens, len(prompt), len(output))
        self._check_prompt_ids(prompt)
        req.prompt_token_ids, req.output_token_ids = prompt, output
        req.prompt_tensor = torch.tensor(prompt, dtype=torch.int64)

    def finish_import(self, request_id: str) -> None:
        """Mark the rows filled: the request becomes DECODING (or PREFILLING if partial)."""
        req = self._get(request_id)
        if req.state is not RequestState.IMPORTING or not req.prompt_token_ids:
            raise EngineError(
                EngineErrorCode.INVALID_STATE,
                f"{request_id!r} is not importing, or has no token ids yet",
            )
        req.kv_range.pins -= 1
        done = req.num_computed_tokens == req.num_prompt_tokens + len(req.output_token_ids) - 1
        req.state = RequestState.DECODING if done else RequestState.PREFILLING

    def import_kv(self, export: KVExport) -> None:
        """Copy an export (from any device) into this engine and make the request runnable."""
        target = self.begin_import(export.metadata)
        try:
            for dst, src in zip(
                target.keys + target.values, export.keys + export.values, strict=True
            ):
                dst.copy_(src)
        except (RuntimeError, ValueError) as exc:
            self.cancel(target.request_id)
            raise EngineError(EngineErrorCode.KV_MISMATCH, f"KV tensors do not fit: {exc}") from exc
        self.finish_import(target.request_id)


def _check_import_counts(
    num_kv_tokens: int, num_prompt_tokens: int, num_output_tokens: int
) -> None:
    """An import continues a decode (KV for all but the last token) or a partial prefill."""
    decoding = num_kv_tokens == num_prompt_tokens + num_output_tokens - 1 and num_output_tokens > 0
    prefilling = num_kv_tokens < num_prompt_tokens and num_output_tokens == 0
    if not (decoding or prefilling) or num_kv_tokens < 0:
        raise EngineError(
            EngineErrorCode.INVALID_ARGUMENT,
            f"num_kv_tokens={num_kv_tokens} fits neither a partial prefill nor a "
            f"decode of prompt {num_prompt_tokens} + output {num_output_tokens}",
        )


def _kv_rows(num_prompt_tokens: int, sampling: SamplingParams) -> int:
    """Rows a request ever writes: the last generated token is never fed back."""
    return num_prompt_tokens + sampling.max_new_tokens - 1
