"""`pecsched generate` and `pecsched model export`, and the GPU benchmark's CPU smoke path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Oracle

from pecsched.cli import main

REPO = Path(__file__).resolve().parents[3]


def test_generate_json_on_an_exported_directory_equals_transformers(
    oracles: dict[str, Oracle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: export through the CLI, then generate from the directory in chunks of 5.
    oracle = oracles["tiny"]
    assert main(["model", "export", "tiny", "--seed", "7", str(tmp_path / "m")]) == 0
    prompt = oracle.prompt(80, 23)
    want = oracle.greedy(prompt, 10)
    oracle.assert_varied(want)
    capsys.readouterr()

    # Execute
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--chunk-tokens",
            "5",
            "--token-ids",
            ",".join(map(str, prompt)),
            "--max-tokens",
            "10",
            "--json",
        ]
    )

    # Assert: the exported seed-7 weights are the oracle's weights, so tokens match.
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["token_ids"] == want
    assert isinstance(out["text"], str)


def test_generate_text_prompt_on_a_preset_and_errors_name_the_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    ok = main(["generate", "--model", "tiny-qwen2", "--prompt", "hi", "--max-tokens", "4"])
    bad = main(["generate", "--model", "nope", "--token-ids", "1", "--max-tokens", "4"])
    huge = main(["generate", "--model", "tiny", "--token-ids", "1", "--max-tokens", "100000"])

    # Assert
    err = capsys.readouterr().err
    assert (ok, bad, huge) == (0, 2, 2)
    assert "neither a directory nor a preset" in err
    assert "exceeds the model limit" in err


@pytest.mark.slow
def test_gpu_benchmark_runs_its_cpu_smoke_path_and_writes_calibration(tmp_path: Path) -> None:
    # Execute
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "engine_gpu.py"),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--dtype",
            "float32",
            "--prefill-tokens",
            "32,64",
            "--decode-batches",
            "1,3",
            "--decode-contexts",
            "16",
            "--decode-steps",
            "2",
            "--matmul-size",
            "64",
            "--copy-mib",
            "4",
            "--quick",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )

    # Assert
    assert result.returncode == 0, result.stderr[-2000:]
    assert "## decode" in result.stdout
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert set(calibration) == {"gpu", "model", "prefill", "decode"}
    assert calibration["model"] == "tiny" and calibration["gpu"] == "cpu"
    assert {(p["tokens"], p["context_tokens"]) for p in calibration["prefill"]} >= {
        (32, 0),
        (64, 0),
    }
    assert all(p["time_s"] > 0 for p in calibration["prefill"] + calibration["decode"])
    assert {(d["batch"], d["context_tokens"]) for d in calibration["decode"]} == {(1, 16), (3, 16)}
    report = json.loads((tmp_path / "engine_gpu.json").read_text())
    assert all("speedup_vs_transformers" in d for d in report["decode"])
