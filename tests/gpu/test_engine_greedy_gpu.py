"""The engine on CUDA (split-KV decode kernel, Triton RoPE, fused projections, CUDA graphs)
generates exactly transformers' greedy output on the same weights.

float32 on both sides (the engine's kernels then differ from transformers' only in summation
order, far below the logit gaps of a greedy choice). Requests of different lengths arrive
together with small chunks, so steps mix decodes with prefill chunks (eager forward with the
split-KV kernel) before the decode-only steps that replay CUDA graphs; contexts up to ~1.2K
tokens make the kernel split keys.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.types import Finished, SamplingParams
from dataplane.models.loading import export_hf_directory, random_model
from dataplane.models.presets import preset_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA device and Triton",
    ),
]
CUDA = torch.device("cuda")
NEW_TOKENS = 24
PROMPT_TOKENS = (5, 77, 300, 1200)


def _prompt(seed: int, num_tokens: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = torch.randint(0, 256, (num_tokens,), generator=gen).tolist()
    return tokens


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_engine_greedy_equals_transformers_on_cuda(preset: str, tmp_path: Path) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM

    model = random_model(preset_config(preset), seed=7, dtype=torch.float32, device=CUDA)
    export_hf_directory(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(CUDA).eval()
    prompts = {f"r{i}": _prompt(i, n) for i, n in enumerate(PROMPT_TOKENS)}
    want = {}
    with torch.inference_mode():
        for rid, prompt in prompts.items():
            out = hf.generate(
                torch.tensor([prompt], device=CUDA),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device=CUDA),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            want[rid] = out[0, len(prompt) :].tolist()
    budget = 8192 * model.shape.kv_bytes_per_token(torch.float32)
    engine = Engine(
        model, EngineConfig(kv_budget_bytes=budget, chunk_tokens=64, max_batch_tokens=128)
    )
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
    got: dict[str, list[int]] = {}

    # Execute
    while engine.has_runnable_work():
        for event in engine.step():
            if isinstance(event, Finished):
                got[event.request_id] = list(event.output_token_ids)

    # Assert
    assert engine.split_kv_decode and engine.graphs is not None, engine.graph_error
    assert got == want
    assert all(len(set(tokens)) >= 8 for tokens in want.values()), want
