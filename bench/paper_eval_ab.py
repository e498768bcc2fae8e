"""Before/after of a policy change on a sample of `bench/paper_eval.py`'s points, in one run:
`pecsched` from a base commit (a `git archive` of it) and from this tree, seed by seed, beside
the baselines (from this tree; the change must leave them alone), with the targets each side
meets.

    .venv/bin/python bench/paper_eval_ab.py --base COMMIT [--seeds 1,2,3]
        [--azure yi-34b:0.25,llama-3.1-70b:0.5] [--synthetic long20-bursty:1.5] [--json OUT]

Runs one simulation at a time (each in the tree's own process); on the Azure suite, whose
seed only breaks the policies' ties, the baselines run on the first seed only. Targets per seed, as
`paper_eval_report` states them, against the baselines run here (fifo, priority, sarathi;
reservation and distserve are not swept here): short p99 queueing >= 95% below the best of
fifo/priority, no higher than sarathi's when sarathi's long JCT is within 1.10x FIFO's, TBT p99
<= 0.1 s, long JCT <= 1.05x FIFO's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("fifo", "priority", "sarathi")
_WORKER = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
from paper_eval import Job, run_job
for line in sys.stdin:
    _, result, cpu = run_job(Job(**json.loads(line)))
    print(json.dumps({"result": result, "cpu_s": cpu}), flush=True)
"""


def _run(tree: Path, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run `jobs` (paper_eval.Job fields) in one process of `tree`'s code."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tree)],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _checkout(commit: str, into: Path) -> Path:
    """`commit`'s files (git archive) in the new folder `into`."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _points(text: str) -> list[tuple[str, float]]:
    return [(p.split(":")[0], float(p.split(":")[1])) for p in text.split(",") if p]


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for model, load in _points(args.azure):
        for seed in args.seeds:
            out.append({"suite": "azure", "model": model, "load": load, "seed": seed})
    for scenario, load in _points(args.synthetic):
        for seed in args.seeds:
            out.append(
                {
                    "suite": scenario,
                    "model": "mistral-7b",
                    "load": load,
                    "seed": seed,
                    "synthetic_requests": args.synthetic_requests,
                }
            )
    return out


def _get(result: dict[str, Any], path: str) -> float:
    v: Any = result
    for key in path.split("."):
        v = v[key]
    return float("nan") if v is None else float(v)


def _targets(pec: dict[str, Any], base: dict[str, dict[str, Any]]) -> str:
    """Which targets `pec` meets against `base` (policy -> result): Q95 / QS / TBT / JCT."""
    qd, jct = "short.queueing_delay_s.p99", "long.jct_mean_s"
    fifo_jct = _get(base["fifo"], jct)
    feasible = {p: r for p, r in base.items() if _get(r, jct) <= 1.10 * fifo_jct}
    paper = [_get(r, qd) for p, r in feasible.items() if p in ("fifo", "priority")]
    marks = []
    if paper:
        marks.append("Q95" if _get(pec, qd) <= 0.05 * min(paper) else "q95")
    if "sarathi" in feasible:
        marks.append("QS" if _get(pec, qd) <= _get(feasible["sarathi"], qd) else "qs")
    marks.append("TBT" if _get(pec, "short.tbt_s.p99") <= 0.1 else "tbt")
    marks.append("JCT" if _get(pec, jct) <= 1.05 * fifo_jct else "jct")
    return " ".join(marks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit before the change")
    ap.add_argument("--after", help="the commit after it (default: this tree as it is)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--azure", default="", help="model:load,... on the Azure suite")
    ap.add_argument("--synthetic", default="", help="scenario:load,... (Mistral-7B)")
    ap.add_argument("--synthetic-requests", type=int, default=3000)
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    jobs = _jobs(args)
    rows: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = _checkout(args.base, Path(tmp) / "before")
        after_tree = _checkout(args.after, Path(tmp) / "after") if args.after else REPO
        print(
            "| point | seed | QD p99 before / after (s) | TBT p99 before / after (s) | "
            "long JCT / FIFO before / after | sarathi QD p99 (s), JCT / FIFO | "
            "targets before / after |",
            flush=True,
        )
        print("|---|---:|---|---|---|---|---|", flush=True)
        for job in jobs:
            mine = {**job, "policy": "pecsched"}
            before = _run(before_tree, [mine])[0]["result"]
            after = _run(after_tree, [mine])[0]["result"]
            key = json.dumps({**job, "seed": 0} if job["suite"] == "azure" else job)
            if key not in baselines:  # azure: the seed only breaks ties (baselines run once)
                runs = _run(after_tree, [{**job, "policy": p} for p in BASELINES])
                baselines[key] = {p: r["result"] for p, r in zip(BASELINES, runs, strict=True)}
            base = baselines[key]
            fifo_jct = _get(base["fifo"], "long.jct_mean_s")
            qd, tbt, jct = "short.queueing_delay_s.p99", "short.tbt_s.p99", "long.jct_mean_s"
            sar = base["sarathi"]
            print(
                f"| {job['suite']} {job['model']} {job['load']} | {job['seed']} | "
                f"{_get(before, qd):.3f} / {_get(after, qd):.3f} | "
                f"{_get(before, tbt):.3f} / {_get(after, tbt):.3f} | "
                f"{_get(before, jct) / fifo_jct:.3f} / {_get(after, jct) / fifo_jct:.3f} | "
                f"{_get(sar, qd):.3f}, {_get(sar, jct) / fifo_jct:.3f} | "
                f"{_targets(before, base)} / {_targets(after, base)} |",
                flush=True,
            )
            rows.append({"job": job, "before": before, "after": after, "baselines": base})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
