"""The state every part of the `Engine` shares, and the rules on its request table.

`EngineBase` declares what `Engine.__init__` (`dataplane.engine.engine`) sets up: the model, its
config, device and dtype, the model's token limit, the attention kernel choice, the KV pool and
the table of resident requests (`_requests`, request id -> `RunningRequest`). The engine's parts
(`admission`, `iteration`, `kv_io`) subclass it and touch that state only through what is here
and in their own module:

* `_get` looks a resident request up (UNKNOWN_REQUEST if absent);
* `_check_new_counts` / `_check_prompt_ids` are the checks every new request passes, admitted
  (`add_request`) or imported (`reserve_import` / `attach_import`);
* `cancel` is the one way a request leaves the table, its KV rows freed at once;
* `kv_rows` is the number of pool rows a request reserves for its whole life.
"""

from __future__ import annotations

import torch

from dataplane.engine.config import AttentionKernel, EngineConfig
from dataplane.engine.cuda_graphs import DecodeGraphs
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.kv_cache import KVCache, KVPlan
from dataplane.engine.requests import RunningRequest
from dataplane.engine.types import SamplingParams
from dataplane.models.llama import LlamaForCausalLM


class EngineBase:
    """The engine's shared state (set by `Engine.__init__`) and the request-table rules."""

    model: LlamaForCausalLM
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    max_model_tokens: int  # prompt + max_new_tokens of one request at most
    kernel: AttentionKernel
    split_kv_decode: bool  # decodes use the Triton split-KV kernel
    kv_plan: KVPlan
    kv: KVCache
    _requests: dict[str, RunningRequest]  # resident requests, in admission order
    _decode_turn: int  # round-robin offset when decodes exceed max_batch_seqs
    num_iterations: int  # iterations run (step() calls that ran a forward)
    last_iteration_tokens: int  # tokens of the latest iteration (decodes + chunks)
    graphs: DecodeGraphs | None
    graph_error: str | None  # why CUDA graphs are off, when they were wanted

    @property
    def attention_kernels(self) -> dict[str, bool]:
        """The kernel choices every `CachedAttention` of this engine is built with."""
        return {
            "use_flash_varlen": self.kernel is AttentionKernel.FLASH_VARLEN,
            "split_kv_decode": self.split_kv_decode,
        }

    def cancel(self, request_id: str) -> int:
        """Drop a request in any state and free its KV rows at once; returns the rows freed."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no request {request_id!r}")
        self.kv.release(req.kv_start)
        return req.kv_rows

    def _get(self, request_id: str) -> RunningRequest:
        req = self._requests.get(request_id)
        if req is None:
            raise EngineError(EngineErrorCode.UNKNOWN_REQUEST, f"no request {request_id!r}")
        return req

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


def kv_rows(num_prompt_tokens: int, sampling: SamplingParams) -> int:
    """Rows a request ever writes: the last generated token is never fed back."""
    return num_prompt_tokens + sampling.max_new_tokens - 1
