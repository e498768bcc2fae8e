"""Agent flags: KV budget units, roles, config validation."""

from __future__ import annotations

import pytest

from dataplane.agent.config import AgentConfig, KvBudget, parse_kv_budget, parse_roles


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", KvBudget(4096, None)),
        ("512MiB", KvBudget(None, 512 * 2**20)),
        ("2GB", KvBudget(None, 2 * 10**9)),
        ("100 tokens", KvBudget(100, None)),
        ("1000b", KvBudget(None, 1000)),
    ],
)
def test_kv_budget_tokens_or_bytes(text: str, expected: KvBudget) -> None:
    assert parse_kv_budget(text) == expected


@pytest.mark.parametrize("text", ["", "-5", "0", "12XB", "lots"])
def test_bad_kv_budget_names_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--kv-budget"):
        parse_kv_budget(text)


def test_roles_default_and_validation() -> None:
    assert parse_roles(None, 2) == ("general", "general")
    assert parse_roles("general, short_decode", 2) == ("general", "short_decode")
    with pytest.raises(ValueError, match="2 roles for --workers 3"):
        parse_roles("general,general", 3)
    with pytest.raises(ValueError, match="unknown role 'decode'"):
        parse_roles("general,decode", 2)


def _config(**overrides: object) -> AgentConfig:
    fields: dict[str, object] = {
        "controlplane": "127.0.0.1:50051",
        "device": "cpu",
        "num_workers": 2,
        "model": "tiny",
        "roles": ("general", "short_decode"),
        "kv_budget": None,
        "node_id": "n1",
        "api_key": None,
    }
    fields.update(overrides)
    return AgentConfig(**fields)  # type: ignore[arg-type]


def test_config_instance_ids_and_validation() -> None:
    assert _config().instance_id(1) == "n1/1"
    for overrides, field in [
        ({"num_workers": 0}, "--workers"),
        ({"device": "tpu"}, "--device"),
        ({"node_id": "a/b"}, "--node-id"),
        ({"controlplane": "nohost"}, "--controlplane"),
        ({"roles": ("general",)}, "--roles"),
        ({"drain_timeout_s": 0.0}, "drain_timeout_s"),
    ]:
        with pytest.raises(ValueError, match=field):
            _config(**overrides)
