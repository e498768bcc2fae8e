"""What `pecsched up` starts for its flags: the model's tokenizer and the OpenAI gateway."""

from __future__ import annotations

from pathlib import Path

from pecsched.cli import build_parser
from pecsched.up import cluster_spec


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
