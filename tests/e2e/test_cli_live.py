"""The client CLI (`pecsched submit/status/cancel/list`) against a live cluster with API keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from e2e_cluster import Cluster, Reference, prompt_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _cli(
    cluster: Cluster, *args: str, key: str | None = "client"
) -> subprocess.CompletedProcess[str]:
    api_key = {"client": cluster.client_key, "admin": cluster.admin_key, None: None}[key]
    auth = ["--api-key", api_key] if api_key else []
    return subprocess.run(
        [sys.executable, "-m", "pecsched", *args, "--target", cluster.target, *auth],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_submit_status_list_cancel(tiny_cluster: Cluster, reference: Reference) -> None:
    # Execute: a text prompt (byte tokenizer) and a token-id prompt
    text = _cli(tiny_cluster, "submit", "hello", "--max-tokens", "8", "--json")
    ids = prompt_ids(900, 40)
    by_ids = _cli(
        tiny_cluster, "submit", "--token-ids", ",".join(map(str, ids)), "--max-tokens", "6",
        "--json",
    )  # fmt: skip

    # Assert
    assert text.returncode == 0, text.stderr
    out = json.loads(text.stdout)
    assert out["state"] == "finished"
    assert out["token_ids"] == reference.greedy(list(b"hello"), 8)
    assert by_ids.returncode == 0, by_ids.stderr
    assert json.loads(by_ids.stdout)["token_ids"] == reference.greedy(ids, 6)

    status = _cli(tiny_cluster, "status", out["request_id"], "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["state"] == "finished" and info["output_tokens"] == 8
    assert info["timestamps"]["first_token"] is not None

    listed = _cli(tiny_cluster, "list", "--json", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    assert out["request_id"] in {r["request_id"] for r in json.loads(listed.stdout)}

    # A long request (SP over the 3 general workers) with a long decode, cancelled while it runs.
    started = _cli(
        tiny_cluster, "submit", "--token-ids", ",".join(map(str, prompt_ids(901, 1100))),
        "--max-tokens", "4800", "--no-wait", "--json",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    rid = json.loads(started.stdout)["request_id"]
    cancelled = _cli(tiny_cluster, "cancel", rid, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    after = json.loads(cancelled.stdout)
    assert after["state"] == "cancelled" and after["output_tokens"] < 4800, after
    human = _cli(tiny_cluster, "status", rid)
    assert human.returncode == 0 and "cancelled" in human.stdout, human.stdout + human.stderr


def test_missing_and_wrong_api_key_are_refused(tiny_cluster: Cluster) -> None:
    # Execute
    missing = _cli(tiny_cluster, "list", key=None)
    wrong = subprocess.run(
        [sys.executable, "-m", "pecsched", "list", "--target", tiny_cluster.target,
         "--api-key", "not-a-key"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    # Assert
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr, missing.stderr
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr
