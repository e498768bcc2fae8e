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

`step()` runs one iteration (decodes first, then prefill chunks within the iteration's token
budget; `dataplane.engine.iteration` states the rule) and returns its events. All model work runs
inside `step()`, so every other call happens at a chunk boundary by construction. `num_iterations`
and `last_iteration_tokens` count the iterations run and the tokens of the latest one.

On CUDA, decodes use the Triton split-KV kernel where it runs (`split_kv_decode`), and
decode-only iterations replay CUDA graphs (`dataplane.engine.cuda_graphs`) when the decode
kernel is split-KV or flash varlen; everything else runs the eager forward.
"""

from __future__ import annotations

from dataplane.engine.admission import EngineAdmission
from dataplane.engine.config import AttentionKernel, EngineConfig, activation_reserve_bytes
from dataplane.engine.cuda_graphs import capture_verified_graphs
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.iteration import EngineIteration
from dataplane.engine.kv_cache import KVCache, plan_pool_tokens
from dataplane.engine.kv_io import EngineKVIO
from dataplane.engine.types import KVImportTarget
from dataplane.models.attention import flash_varlen_works, split_kv_decode_works
from dataplane.models.llama import LlamaForCausalLM

__all__ = ["AttentionKernel", "Engine", "EngineConfig", "KVImportTarget"]


class Engine(EngineAdmission, EngineIteration, EngineKVIO):
    """Runs one model instance: see the module docstring for the request life cycle.

    Its calls are grouped by part: admission and control (`dataplane.engine.admission`),
    iterations (`dataplane.engine.iteration`), KV export/import (`dataplane.engine.kv_io`);
    the state they share and the request-table rules are in `dataplane.engine.base`.
    """

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
        self.kv_plan = plan_pool_tokens(
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
        self._requests = {}
        self._decode_turn = 0
        self.num_iterations = 0
        self.last_iteration_tokens = 0
        self.graphs = None
        self.graph_error = None
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
