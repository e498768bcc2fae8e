"""Fixtures for the data-plane model/engine tests: seeded presets and transformers as the oracle.

Each preset is exported once per session to an HF directory and loaded back with
`transformers.AutoModelForCausalLM`; greedy references come from `generate` on that model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dataplane.engine.engine import Engine, EngineConfig
from dataplane.engine.types import EngineEvent, Finished
from dataplane.models.llama import LlamaForCausalLM
from dataplane.models.loading import export_hf_directory, random_model
from dataplane.models.presets import preset_config

CPU = torch.device("cpu")
PRESETS = ("tiny", "tiny-qwen2")


@dataclass(frozen=True)
class Oracle:
    """Our model, the same weights in transformers, and a greedy reference helper."""

    preset: str
    model: LlamaForCausalLM
    hf_model: Any
    directory: Path

    def greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        """transformers' greedy continuation of `prompt`."""
        with torch.inference_mode():
            out = self.hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
            )
        tokens: list[int] = out[0, len(prompt) :].tolist()
        return tokens

    @staticmethod
    def prompt(seed: int, num_tokens: int) -> list[int]:
        """A seeded random prompt of byte-range token ids."""
        gen = torch.Generator().manual_seed(seed)
        tokens: list[int] = torch.randint(0, 256, (num_tokens,), generator=gen).tolist()
        return tokens

    def engine(self, kv_tokens: int = 4096, **config: Any) -> Engine:
        """A CPU engine on this preset whose pool holds exactly `kv_tokens` rows."""
        budget = kv_tokens * self.model.shape.kv_bytes_per_token(torch.float32)
        return Engine(self.model, EngineConfig(kv_budget_bytes=budget, **config))

    @staticmethod
    def run(
        engine: Engine, on_step: Callable[[int, list[EngineEvent]], None] | None = None
    ) -> dict[str, list[int]]:
        """Step until nothing is runnable; returns request_id -> output of finished ones."""
        outputs: dict[str, list[int]] = {}
        step = 0
        while engine.has_runnable_work():
            events = engine.step()
            for event in events:
                if isinstance(event, Finished):
                    outputs[event.request_id] = list(event.output_token_ids)
            if on_step is not None:
                on_step(step, events)
            step += 1
        return outputs

    @staticmethod
    def assert_varied(tokens: list[int]) -> None:
        """Guard against a degenerate reference that any echoing engine would match."""
        assert len(set(tokens)) >= max(3, len(tokens) // 3), f"reference not varied: {tokens}"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def oracles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Oracle]:
    """Every test preset with its transformers twin (built once per session)."""
    from transformers import AutoModelForCausalLM

    result = {}
    for preset in PRESETS:
        model = random_model(preset_config(preset), seed=7, dtype=torch.float32, device=CPU)
        directory = tmp_path_factory.mktemp(preset)
        export_hf_directory(model, directory)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        result[preset] = Oracle(preset, model, hf_model, directory)
    return result


@pytest.fixture(params=PRESETS)
def oracle(request: pytest.FixtureRequest, oracles: dict[str, Oracle]) -> Oracle:
    """One test preset (parametrized over all of them)."""
    return oracles[request.param]
