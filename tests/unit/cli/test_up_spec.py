"""What `pecsched up` starts for its flags: the model's tokenizer and the OpenAI gateway."""

from __future__ import annotations

from pathlib import Path

from pecsched.cli import build_parser
from pecsched.up import cluster_spec, usable_cores


def test_up_hands_a_model_directory_tokenizer_over_and_starts_the_gateway(tmp_path: Path) -> None:
    # Prepare: a model directory with a tokenizer (its content is read by the control plane)
    (tmp_path / "tokenizer.json").write_text("{}")
    parser = build_parser()
    # Execute
    from_dir = cluster_spec(parser.parse_args(["up", "--model", str(tmp_path)]))
    preset = cluster_spec(parser.parse_args(["up", "--http-port", "0"]))
    # Assert
    assert from_dir.tokenizer_dir == str(tmp_path) and from_dir.model_name == tmp_path.name
    assert from_dir.http_port == 8000
    assert preset.tokenizer_dir is None and preset.model_name == "tiny"
    assert preset.http_port is None


def test_up_on_cpu_starts_one_general_worker_per_core_and_a_short_decode_one() -> None:
    # Prepare
    parser = build_parser()
    cores = usable_cores()
    # Execute
    spec = cluster_spec(parser.parse_args(["up"]))
    explicit = cluster_spec(parser.parse_args(["up", "--workers", "2", "--kv-budget", "4096"]))
    # Assert: KV for all of tiny's 16,384 positions, unless --kv-budget says otherwise
    (agent,) = spec.agents
    assert agent.roles == ("general",) * min(cores, 3) + ("short_decode",)
    assert agent.kv_budget == "16384"
    assert explicit.agents[0].roles == ("general", "short_decode")
    assert explicit.agents[0].kv_budget == "4096"
