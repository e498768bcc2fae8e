"""bench/paper_eval.py in shards: every job runs in exactly one shard, and the merged
document equals the one an unsharded run writes (but for its header line)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import paper_eval  # noqa: E402

TINY = ["--quick", "--models", "mistral-7b", "--loads", "0.5", "--scenarios", ""]
TINY += ["--seeds", "1", "--max-requests", "300", "--jobs", "1"]


def test_shards_split_the_jobs_and_their_merge_writes_the_unsharded_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: run times go to a scratch file, not the repository's
    monkeypatch.setattr(paper_eval, "TIMES", tmp_path / "times.json")
    shards = [tmp_path / f"shard{i}.json" for i in (1, 2, 3)]

    # Execute: three shards, their merge, and the same flags unsharded
    for i, path in enumerate(shards, start=1):
        assert paper_eval.main([*TINY, "--shard", f"{i}/3", "--json", str(path)]) == 0
    merged, single = tmp_path / "merged" / "evaluation.md", tmp_path / "single" / "evaluation.md"
    assert paper_eval.main(["--merge", *map(str, shards[::-1]), "--out", str(merged)]) == 0
    assert paper_eval.main([*TINY, "--out", str(single)]) == 0

    # Assert: the same document after the header line, which names the shards and the command
    merged_lines, single_lines = merged.read_text().splitlines(), single.read_text().splitlines()
    assert merged_lines[3:] == single_lines[3:]
    assert "in 3 shards" in merged_lines[2] and "--merge shard_*.json" in merged_lines[2]
    assert "--max-requests 300" in merged_lines[2]


def test_a_merge_refuses_missing_or_mismatched_shards(tmp_path: Path) -> None:
    # Prepare: two of three shards
    shards = [tmp_path / f"shard{i}.json" for i in (1, 2)]
    for i, path in enumerate(shards, start=1):
        assert paper_eval.main([*TINY, "--shard", f"{i}/3", "--json", str(path)]) == 0

    # Execute / Assert
    with pytest.raises(SystemExit, match="need shards 1..3 once each"):
        paper_eval.main(["--merge", *map(str, shards), "--out", str(tmp_path / "e.md")])


def test_jobs_are_dealt_longest_first_to_the_least_loaded_shard() -> None:
    jobs, scale = paper_eval.build_jobs(paper_eval.parse_args(["--seeds", "1"]))
    every = scale + jobs

    shards = paper_eval.deal(every, 4)

    assert sorted(i for shard in shards for i in shard) == list(range(len(every)))
    loads = [sum(paper_eval.estimated_cpu_s(every[i]) for i in shard) for shard in shards]
    biggest = max(paper_eval.estimated_cpu_s(j) for j in every)
    assert max(loads) - min(loads) <= biggest
    assert shards == paper_eval.deal(every, 4)  # deterministic


def test_shape_argv_keeps_only_the_flags_that_change_what_runs() -> None:
    argv = ["--quick", "--jobs", "4", "--seeds=1,2", "--shard", "2/3", "--json", "x.json"]
    assert paper_eval.shape_argv(argv) == ["--quick", "--seeds=1,2"]
