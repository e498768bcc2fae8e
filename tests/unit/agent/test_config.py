"""Agent flags: KV budget units, roles, config validation, API key and TLS sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.agent.config import (
    API_KEY_ENV,
    AgentConfig,
    KvBudget,
    load_api_key,
    load_link_tls,
    parse_kv_budget,
    parse_roles,
)


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


def test_api_key_from_the_flag_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {API_KEY_ENV: "from-env"}
    assert load_api_key("from-flag", None, env) == "from-flag"
    assert load_api_key(None, str(key_file), env) == "from-file"
    assert load_api_key(None, None, env) == "from-env"
    assert load_api_key(None, None, {}) is None


@pytest.mark.parametrize(
    ("flag", "file", "match"),
    [
        ("k", "key", "--api-key and --api-key-file"),
        (None, "missing", "--api-key-file .*missing"),
        (None, "empty", "holds no key"),
    ],
)
def test_bad_api_key_sources_name_the_flag(
    tmp_path: Path, flag: str | None, file: str, match: str
) -> None:
    (tmp_path / "key").write_text("k\n")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=match):
        load_api_key(flag, str(tmp_path / file), {})


def test_link_tls_from_the_flags(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_bytes(name.encode())
    ca, cert, key = (str(tmp_path / n) for n in ("ca.pem", "c.pem", "c.key"))
    assert load_link_tls(False, None, None, None) is None
    system_roots = load_link_tls(True, None, None, None)
    assert system_roots is not None and system_roots.root_certificates is None
    mutual = load_link_tls(False, ca, cert, key)
    assert mutual is not None
    assert (mutual.root_certificates, mutual.certificate_chain, mutual.private_key) == (
        b"ca.pem",
        b"c.pem",
        b"c.key",
    )
    with pytest.raises(ValueError, match="--tls-cert-file and --tls-key-file"):
        load_link_tls(False, ca, cert, None)
    with pytest.raises(ValueError, match="--tls-ca-file .*nope"):
        load_link_tls(False, str(tmp_path / "nope"), None, None)
