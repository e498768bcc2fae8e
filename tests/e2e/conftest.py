"""Fixtures of the end-to-end tests (helpers and the cluster launcher are in e2e_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from e2e_cluster import (
    ACTIVE_STATES,
    WEIGHT_SEED,
    Cluster,
    Reference,
    start_cluster,
    tiny_agent,
)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The tiny preset (seed WEIGHT_SEED) exported by the CLI and loaded by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-hf")
    done = subprocess.run(
        [sys.executable, "-m", "pecsched", "model", "export", "tiny", str(directory),
         "--seed", str(WEIGHT_SEED)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return Reference(model, directory)


@pytest.fixture(scope="session")
def tiny_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One agent with 4 tiny workers (3 general, 1 short-decode) under `pecsched`, auth on."""
    tmp = tmp_path_factory.mktemp("tiny-cluster")
    cluster = start_cluster(
        tmp, (tiny_agent("node-a", ("general", "general", "general", "short_decode")),)
    )
    yield cluster
    cluster.local.stop()


@pytest.fixture(autouse=True)
def _cancel_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the shared cluster, cancel what it left running (isolates failures)."""
    yield
    if "tiny_cluster" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("tiny_cluster")
    with cluster.client() as client:
        for info in client.list_requests(states=ACTIVE_STATES):
            client.cancel(info.request_id)
