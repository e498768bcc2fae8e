"""KV export and import: a resident request's KV rows handed to another engine, or taken in.

Export (`EngineKVIO.export_kv`) gives metadata and per-layer views of a request's valid rows and
pins them (compaction will not move them) until a matching `release_export`, or until the request
ends. Import reserves rows for an incoming request (`reserve_import`, from the counts alone: the
copy can start before the token ids are decoded), gives it its token ids (`attach_import`), and
makes it runnable once the rows are filled (`finish_import`): DECODING when the KV covers all but
the last token, PREFILLING for a partial prefill. The request is IMPORTING, pinned, in between;
`cancel` undoes an import at any point. `begin_import` is reserve + attach; `import_kv` copies a
whole `KVExport` in one call. A layout other than this engine's is KV_MISMATCH.
"""

from __future__ import annotations

import torch

from dataplane.engine.base import EngineBase, kv_rows
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState, RunningRequest
from dataplane.engine.types import KVExport, KVImportTarget, KVMetadata


class EngineKVIO(EngineBase):
    """Exporting a request's KV rows and importing another engine's."""

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
        rows = self.kv.reserve_movable(meta.request_id, kv_rows(num_prompt_tokens, meta.sampling))
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
        if kv_rows(len(prompt), req.sampling) != req.kv_rows:
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
