"""Fixtures: a scripted control plane, a live agent attached to it, greedy references."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from otlp_receiver import OtlpReceiver  # noqa: E402
from scripted import ScriptedControlPlane  # noqa: E402

from dataplane.engine.engine import Engine, EngineConfig  # noqa: E402
from dataplane.engine.types import Finished, SamplingParams  # noqa: E402
from dataplane.models.loading import random_model  # noqa: E402
from dataplane.models.presets import preset_config  # noqa: E402

SEED = 0  # the agent's default weight seed


class Reference:
    """Greedy outputs of one in-process engine on the same seeded `tiny` weights."""

    def __init__(self) -> None:
        self.model = random_model(
            preset_config("tiny"), seed=SEED, dtype=torch.float32, device=torch.device("cpu")
        )
        budget = 8192 * self.model.shape.kv_bytes_per_token(torch.float32)
        self._engine = Engine(self.model, EngineConfig(kv_budget_bytes=budget))
        self._n = 0

    def transformers_greedy(self, directory: Path, prompt: list[int], num_tokens: int) -> list[int]:
        """`transformers`' greedy continuation on the same weights (exported to `directory`)."""
        from transformers import AutoModelForCausalLM

        from dataplane.models.loading import export_hf_directory

        export_hf_directory(self.model, directory)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
            )
        tokens: list[int] = out[0, len(prompt) :].tolist()
        return tokens

    def greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        """The engine's greedy continuation (one request alone, default chunking)."""
        self._n += 1
        rid = f"ref-{self._n}"
        self._engine.add_request(rid, prompt, SamplingParams(max_new_tokens=num_tokens))
        while self._engine.has_runnable_work():
            for event in self._engine.step():
                if isinstance(event, Finished) and event.request_id == rid:
                    return list(event.output_token_ids)
        raise AssertionError("reference engine did not finish")


def prompt(seed: int, num_tokens: int) -> list[int]:
    """A seeded prompt of byte-range token ids."""
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = torch.randint(0, 256, (num_tokens,), generator=gen).tolist()
    return tokens


@pytest.fixture(scope="session")
def reference() -> Reference:
    """The shared greedy reference."""
    torch.set_num_threads(1)
    return Reference()


@dataclass
class LiveAgent:
    """An agent running in a thread of this process, attached to `cp`."""

    cp: ScriptedControlPlane
    node_id: str
    thread: threading.Thread
    result: dict[str, Any]
    otlp: OtlpReceiver  # receives the agent's spans


@pytest.fixture(scope="module")
def live() -> Iterator[LiveAgent]:
    """2 CPU workers (general, short_decode) on `tiny`, attached to a scripted CP."""
    from dataplane.agent.agent import run_agent
    from dataplane.agent.config import AgentConfig
    from protos.pecsched.v1 import cluster_pb2

    cp = ScriptedControlPlane(heartbeat_interval_s=0.2)
    port = cp.start()
    otlp = OtlpReceiver()
    config = AgentConfig(
        controlplane=f"127.0.0.1:{port}",
        device="cpu",
        num_workers=2,
        model="tiny",
        roles=("general", "short_decode"),
        kv_budget=None,
        node_id="n1",
        api_key="secret",
        group_timeout_s=20.0,
        otlp_endpoint=f"http://127.0.0.1:{otlp.port}",
    )
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("rc", run_agent(config, install_signals=False)),
        daemon=True,
    )
    thread.start()
    cp.wait_for(lambda: cp.registers, 180, "the agent's Register")
    yield LiveAgent(cp, "n1", thread, result, otlp)
    cp.command(shutdown=cluster_pb2.Shutdown(drain=False))
    thread.join(timeout=60)
    cp.stop()
    otlp.stop()
