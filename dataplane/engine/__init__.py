"""One worker's engine: KV cache, iteration loop, chunked prefill, sampling.

Public API (import from here or from the defining module):

* `Engine(model, EngineConfig(...))`: `add_request`, `step() -> list[EngineEvent]`, `pause`,
  `resume`, `cancel`, `can_fit` / `can_fit_kv_tokens` / `largest_fit_kv_tokens` (compaction
  included), `export_kv` + `release_export` / `import_kv` / `begin_import` + `finish_import`.
* Values: `SamplingParams`, events `ChunkDone`, `PrefillDone`, `TokenGenerated`, `Finished`,
  KV records `KVMetadata`, `KVExport`, `KVImportTarget`; errors `EngineError` with
  `EngineErrorCode`.
"""

from dataplane.engine.config import AttentionKernel, EngineConfig
from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.requests import RequestState
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

__all__ = [
    "AttentionKernel",
    "ChunkDone",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineErrorCode",
    "EngineEvent",
    "FinishReason",
    "Finished",
    "KVExport",
    "KVImportTarget",
    "KVMetadata",
    "PrefillDone",
    "RequestState",
    "SamplingParams",
    "TokenGenerated",
]
