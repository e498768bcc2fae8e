"""End-to-end helpers: real control plane and agent processes on loopback, tiny on CPU.

Clusters are `pecsched.cluster.LocalCluster`s (the code `pecsched up` runs). The correctness
oracle is transformers' greedy output on the tiny preset exported with `pecsched model export`,
the same seeded weights the agents build. Database assertions read the SQLite file directly.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from pecsched.cluster import AgentSpec, ClusterSpec, LocalCluster, free_port
from sdk.client import Client
from sdk.types import RequestInfo, RequestState

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHT_SEED = 7  # tiny preset weights, same in agents and the reference
KV_BUDGET_TOKENS = 2048  # per worker: a 4,500-token prompt needs SP over 3 instances
SCHEDULER_TOML = """\
[scheduler]
short_threshold_tokens = 1024
chunk_tokens = 128
short_decode_colocation = false
short_preempt_delay_s = 0.0
"""  # shorts preempt at once and never prefill on the decoder: each technique shows on its own


def prompt_ids(seed: int, num_tokens: int) -> list[int]:
    """Seeded prompt token ids in [1, 256)."""
    return [int(t) for t in np.random.default_rng(seed).integers(1, 256, size=num_tokens)]


@dataclass
class Reference:
    """transformers' greedy continuation on the exported tiny weights (memoized)."""

    hf_model: Any
    directory: Path  # the exported HF directory (config.json + model.safetensors)
    _cache: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        """The first `num_tokens` greedy tokens after `prompt`."""
        import torch

        key = (tuple(prompt), num_tokens)
        if key not in self._cache:
            with torch.inference_mode():
                out = self.hf_model.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                    max_new_tokens=num_tokens,
                    min_new_tokens=num_tokens,
                    do_sample=False,
                )
            self._cache[key] = out[0, len(prompt) :].tolist()
        return self._cache[key]


def create_api_key(db_url: str, role: str, tenant: str) -> str:
    """`pecsched keys create` on an upgraded database; returns the key."""
    done = subprocess.run(
        [sys.executable, "-m", "pecsched", "keys", "create", "--role", role, "--tenant", tenant,
         "--db", db_url],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Cluster:
    """A started LocalCluster with its keys and database file."""

    local: LocalCluster
    db_path: Path
    client_key: str | None
    admin_key: str | None

    @property
    def target(self) -> str:
        return self.local.spec.target

    def client(self) -> Client:
        """A client with the client key (tenant e2e)."""
        return Client(self.target, api_key=self.client_key, timeout_s=30.0)

    def admin_client(self) -> Client:
        """A client with the admin key (Watch, every tenant)."""
        return Client(self.target, api_key=self.admin_key, timeout_s=30.0)

    def events(
        self, request_ids: list[str] | None = None
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(request_id, kind, instance_id, details) rows of request_events, in id order."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute(
                "SELECT request_id, kind, coalesce(instance_id, ''), details "
                "FROM request_events ORDER BY id"
            ).fetchall()
        out = []
        for rid, kind, instance, details in rows:
            if request_ids is None or rid in request_ids:
                parsed = json.loads(details) if isinstance(details, str) and details else {}
                out.append((rid, kind, instance, parsed))
        return out

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query on the cluster's database."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql).fetchall()


def start_cluster(
    tmp_path: Path,
    agents: tuple[AgentSpec, ...],
    *,
    auth: bool = True,
    config_toml: str = SCHEDULER_TOML,
    policy: str = "pecsched",
    tokenizer_dir: str | None = None,
    http_port: int | None = None,
    otlp_endpoint: str | None = None,
) -> Cluster:
    """Upgrade a fresh SQLite database, create keys, start the control plane and agents (and
    the OpenAI gateway on `http_port`, serving model id "tiny-chat", when given; all export
    spans to `otlp_endpoint` when given)."""
    db_path = tmp_path / "pecsched.db"
    db_url = f"sqlite:///{db_path}"
    toml = config_toml if auth else "auth_enabled = false\n" + config_toml
    spec = ClusterSpec(db_url=db_url, port=free_port(), policy=policy, config_toml=toml)
    probe = LocalCluster(spec, tmp_path / "logs")
    probe.upgrade_db()
    admin_key = create_api_key(db_url, "admin", "ops") if auth else None
    client_key = create_api_key(db_url, "client", "e2e") if auth else None
    with_keys = tuple(
        AgentSpec(
            a.node_id, a.roles, a.model, a.device, a.kv_budget, a.seed,
            a.extra_args + (("--api-key", admin_key) if admin_key else ()),
        )
        for a in agents
    )  # fmt: skip
    spec = ClusterSpec(
        db_url=db_url,
        port=spec.port,
        policy=policy,
        config_toml=toml,
        agents=with_keys,
        tokenizer_dir=tokenizer_dir,
        http_port=http_port,
        model_name="tiny-chat",
        otlp_endpoint=otlp_endpoint,
    )
    local = LocalCluster(spec, tmp_path / "logs", api_key=admin_key)
    try:
        local.start(ready_timeout_s=120.0)
    except BaseException:
        local.stop(grace_s=2.0)
        raise
    return Cluster(local, db_path, client_key, admin_key)


def tiny_agent(node_id: str, roles: tuple[str, ...]) -> AgentSpec:
    """An agent of tiny workers (seeded weights, KV_BUDGET_TOKENS each)."""
    return AgentSpec(node_id, roles, "tiny", "cpu", str(KV_BUDGET_TOKENS), WEIGHT_SEED)


def wait_for(
    client: Client,
    request_id: str,
    condition: Callable[[RequestInfo], bool],
    timeout_s: float,
    poll_s: float = 0.005,
) -> RequestInfo:
    """Poll Get until `condition(info)`; fails the test with the last state on timeout."""

    def met() -> RequestInfo | None:
        info = client.get(request_id)
        return info if condition(info) else None

    return wait_until(met, f"{request_id}: condition", timeout_s, poll_s)


def wait_idle(cluster: Cluster, timeout_s: float = 30.0) -> None:
    """Wait until no instance holds a request or KV (fails with the last snapshot)."""
    with cluster.admin_client() as client:
        deadline = time.monotonic() + timeout_s
        for snapshot in client.watch(interval_s=0.2, timeout_s=timeout_s):
            busy = [
                (i.instance_id, i.kv_used_tokens, i.request_ids)
                for i in snapshot.instances
                if i.kv_used_tokens or i.request_ids
            ]
            if not busy:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"instances still hold KV or requests: {busy}")
    pytest.fail("watch ended before the cluster went idle")


TERMINAL = (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)
ACTIVE_STATES = (
    RequestState.QUEUED,
    RequestState.PREFILLING,
    RequestState.PAUSED,
    RequestState.TRANSFERRING_KV,
    RequestState.DECODING,
)
