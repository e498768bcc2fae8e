"""Reproduce the paper's evaluation in the simulator, over several seeds, and write
docs/evaluation.md (tables, plots and targets; nothing in it is edited by hand).

    .venv/bin/python bench/paper_eval.py [--quick] [--jobs N] [--seeds 1,2,3]
        [--models m1,m2] [--loads 0.25,0.5,...] [--scenarios s1,s2] [--max-requests N]
        [--synthetic-requests N] [--skip-scale] [--out docs/evaluation.md] [--json OUT]

Two suites, both on 32 x A100-80GB with the paper's TP:
* azure: the merged one-hour Azure trace, prompts >= 4096 tokens min-max rescaled into
  [100K, 500K] (the paper's setup), for each paper model at several offered prefill loads;
* synthetic: seeded heavy-tail workloads (`sim.workloads.heavy_tail`: log-normal lengths,
  Poisson or bursty arrivals, 5-60% long) on Mistral-7B at several loads.
Every (suite, model, load) point runs under every registered policy and seed: fifo, priority,
pecsched, sarathi; reservation over a sweep of reserve sizes up to all-but-one instance;
distserve over a sweep of decode-instance counts; the PecSched ablations at loads >= 0.5 of
the azure suite. Then a 10,000-GPU run measures the simulator at scale. Runs are independent
and go through a process pool; `paper_eval_doc` writes the document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from paper_eval_doc import write_markdown  # noqa: E402
from paper_eval_report import Run  # noqa: E402

from controlplane.core.config import SchedulerConfig  # noqa: E402
from controlplane.core.policies.registry import policy_names  # noqa: E402
from sim import workloads as wl  # noqa: E402
from sim.cost_model import CostModel  # noqa: E402
from sim.engine import ClusterSpec  # noqa: E402
from sim.hardware import GPUS, MODELS, PAPER_TP  # noqa: E402
from sim.report import result_to_dict  # noqa: E402
from sim.runner import prefill_load, run_policy  # noqa: E402

PAPER_MODELS = ("mistral-7b", "phi-3-14b", "yi-34b", "llama-3.1-70b")
GPUS_32 = 32
SINGLE = ("fifo", "priority", "pecsched", "sarathi")  # run once per point and seed
ABLATIONS = ("pecsched-no-preempt", "pecsched-no-disagg", "pecsched-no-coloc", "pecsched-ring")
ABLATION_MIN_LOAD = 0.5  # ablations run at azure loads from here up
RESERVE_KNOB = "num_long_reserved_instances"
DISTSERVE_KNOB = "distserve_decode_instances"  # the distserve split (decode instances)
SYNTHETIC_MODEL = "mistral-7b"
SCENARIOS: dict[str, tuple[float, float]] = {  # name: (long fraction, inter-arrival cv)
    "long5-poisson": (0.05, 1.0),
    "long20-poisson": (0.20, 1.0),
    "long20-bursty": (0.20, 4.0),
    "long60-poisson": (0.60, 1.0),
}
SCALE_LOADS = (0.75, 1.0)  # per-GPU offered prefill loads of the 10,000-GPU runs
SCALE_WINDOW_S = 0.005  # event batching window of the 10,000-GPU run
FULL = {
    "seeds": "1,2,3",
    "models": ",".join(PAPER_MODELS),
    "loads": "0.25,0.5,0.75,1.0",
    "scenarios": ",".join(SCENARIOS),
    "synthetic_loads": "0.5,1.0,1.5",
    "synthetic_requests": 3000,
}
QUICK = {  # a subset that finishes in minutes on a 2-core machine
    "seeds": "1,2,3",
    "models": "mistral-7b",
    "loads": "0.5,1.0",
    "scenarios": "long20-poisson,long20-bursty",
    "synthetic_loads": "1.0",
    "synthetic_requests": 800,
    "max_requests": 4000,
}


@dataclass(frozen=True, slots=True)
class Job:
    """One simulation to run in a worker process."""

    suite: str  # "azure" or a SCENARIOS name
    model: str
    load: float  # offered prefill load (see sim.runner.prefill_load)
    seed: int  # the policy's tie-breaks; the synthetic workload's draw
    policy: str
    knob: str = ""  # a SchedulerConfig field swept for this policy, "" for none
    knob_value: int | None = None  # its value (None: the policy's default)
    max_requests: int | None = None  # azure: keep the first N arrivals
    synthetic_requests: int = 0  # synthetic: requests drawn
    gpus: int = GPUS_32
    tile_copies: int = 1  # the scale run tiles the trace
    batch_window_s: float = 0.0  # the scale run hands events to the policy in windows

    @property
    def variant(self) -> str:
        """Policy name plus its swept knob's value (`reservation r=4`, `distserve d=8`)."""
        if not self.knob:
            return self.policy
        value = "default" if self.knob_value is None else str(self.knob_value)
        return f"{self.policy} {'r' if self.knob == RESERVE_KNOB else 'd'}={value}"


def cost_of(model: str) -> CostModel:
    """The paper's A100 instance of `model`."""
    return CostModel(MODELS[model], GPUS["a100"], PAPER_TP[model])


@lru_cache(maxsize=1)
def _azure_base() -> wl.Workload:
    return wl.rescale_long(wl.load_azure_traces(list(wl.AZURE_TRACES)), 100_000, 500_000)


@lru_cache(maxsize=64)
def native_load(suite: str, model: str, seed: int, synthetic_requests: int) -> float:
    """Offered prefill load of the suite's workload at its own pace (synthetic: 1 req/s)."""
    return prefill_load(_base(suite, seed, synthetic_requests), cost_of(model), _CONFIG, GPUS_32)


_CONFIG = SchedulerConfig()


def _base(suite: str, seed: int, synthetic_requests: int) -> wl.Workload:
    if suite == "azure":
        return _azure_base()
    long_fraction, cv = SCENARIOS[suite]
    return wl.heavy_tail(wl.HeavyTailSpec(synthetic_requests, 1.0, long_fraction, cv), seed)


def workload_of(job: Job) -> wl.Workload:
    """The job's workload, its arrivals scaled to the job's offered load."""
    seed = job.seed if job.suite != "azure" else 0
    base = _base(job.suite, seed, job.synthetic_requests)
    scale = native_load(job.suite, job.model, seed, job.synthetic_requests) / job.load
    if job.tile_copies > 1:
        base = wl.tile(base, job.tile_copies, seed=job.seed)
    w = wl.scale_time(base, scale)
    return wl.head(w, job.max_requests) if job.max_requests else w


def run_job(job: Job) -> tuple[Job, dict[str, Any], float]:
    """Run one simulation: the job, its `pecsched sim --json` result and its CPU seconds."""
    started = time.process_time()
    config = _CONFIG
    if job.knob:
        override: dict[str, Any] = {job.knob: job.knob_value}
        config = replace(config, **override)
    outcome = run_policy(
        workload_of(job),
        ClusterSpec(job.gpus, cost_of(job.model)),
        job.policy,
        config,
        job.seed,
        batch_window_s=job.batch_window_s,
    )
    return job, result_to_dict(outcome.result), time.process_time() - started


def sweep(instances: int, fractions: tuple[float, ...]) -> list[int]:
    """Distinct instance counts at `fractions` of `instances`, within [1, instances - 1]."""
    return sorted({min(instances - 1, max(1, round(f * instances))) for f in fractions})


def point_jobs(mk: Job, registered: tuple[str, ...], ablations: bool) -> list[Job]:
    """Every policy variant of one (suite, model, load, seed) point."""
    instances = GPUS_32 // PAPER_TP[mk.model]
    out = [replace(mk, policy=p) for p in SINGLE if p in registered]
    reserve = [None, *sweep(instances, (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0))]  # up to all-but-one
    out += [replace(mk, policy="reservation", knob=RESERVE_KNOB, knob_value=r) for r in reserve]
    if "distserve" in registered:
        if DISTSERVE_KNOB in {f.name for f in fields(SchedulerConfig)}:
            split = sweep(instances, (1 / 8, 1 / 4, 3 / 8, 1 / 2))
            out += [
                replace(mk, policy="distserve", knob=DISTSERVE_KNOB, knob_value=d) for d in split
            ]
        else:
            out.append(replace(mk, policy="distserve"))
    if ablations:
        out += [replace(mk, policy=p) for p in ABLATIONS if p in registered]
    return out


def build_jobs(args: argparse.Namespace) -> tuple[list[Job], list[Job]]:
    """The evaluation's jobs and the scale jobs."""
    registered = policy_names()
    jobs: list[Job] = []
    for seed in args.seeds:
        for model in args.models:
            for load in args.loads:
                mk = Job("azure", model, load, seed, "", max_requests=args.max_requests)
                jobs += point_jobs(mk, registered, load >= ABLATION_MIN_LOAD)
        for scenario in args.scenarios:
            for load in args.synthetic_loads:
                mk = Job(scenario, SYNTHETIC_MODEL, load, seed, "")
                jobs += point_jobs(
                    replace(mk, synthetic_requests=args.synthetic_requests), registered, False
                )
    scale: list[Job] = []
    if not args.skip_scale:
        copies = -(-args.scale_gpus // GPUS_32)
        for load in SCALE_LOADS:
            for policy in ("pecsched", "fifo"):
                scale.append(
                    Job(
                        "azure",
                        "mistral-7b",
                        load,
                        0,
                        policy,
                        max_requests=args.scale_requests,
                        gpus=args.scale_gpus,
                        tile_copies=copies,
                        batch_window_s=SCALE_WINDOW_S,
                    )
                )
    return jobs, scale


def machine() -> str:
    """The CPU model, core count and Python of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def head_commit() -> str:
    """HEAD's short hash, marked `+changes` when the tree differs from it."""
    git = ["git", "-C", str(REPO)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


TIMES = REPO / "bench" / "results" / "paper_eval_times.json"  # the last full and quick runs


def _shaped(argv: list[str]) -> bool:
    """True when flags other than --quick, --jobs, --out and --json change what runs (such a
    run's time is not the full or quick evaluation's)."""
    free = {"--quick", "--jobs", "--out", "--json"}
    return any(a.startswith("--") and a.split("=")[0] not in free for a in argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; `--quick` fills the unset ones from QUICK, otherwise from FULL."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset for a 2-core machine")
    ap.add_argument("--seeds")
    ap.add_argument("--models")
    ap.add_argument("--loads")
    ap.add_argument("--scenarios", help=f"synthetic scenarios: {', '.join(SCENARIOS)}")
    ap.add_argument("--synthetic-loads")
    ap.add_argument("--synthetic-requests", type=int)
    ap.add_argument("--max-requests", type=int, help="azure: keep the first N arrivals")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--scale-gpus", type=int, default=10_000)
    ap.add_argument("--scale-requests", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(REPO / "docs" / "evaluation.md"))
    ap.add_argument("--json", default=None, help="also write every run's numbers as JSON")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.skip_scale = True
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    args.models = str(args.models).split(",")
    args.loads = [float(x) for x in str(args.loads).split(",")]
    args.scenarios = [s for s in str(args.scenarios).split(",") if s]
    args.synthetic_loads = [float(x) for x in str(args.synthetic_loads).split(",")]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or len(args.seeds) < 1:
        ap.error(f"unknown scenarios {unknown}" if unknown else "--seeds: at least one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = head_commit()  # the code that runs, before anything is written
    jobs, scale_jobs = build_jobs(args)
    started = time.perf_counter()
    cpu_s = 0.0
    print(f"{len(jobs) + len(scale_jobs)} simulations on {args.jobs} processes", flush=True)
    runs: list[Run] = []
    scale: list[Run] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        scale_futures = [pool.submit(run_job, job) for job in scale_jobs]  # longest first
        for i, (job, result, cpu) in enumerate(pool.map(run_job, jobs, chunksize=1)):
            runs.append(Run(job, result))
            cpu_s += cpu
            print(
                f"  [{i + 1}/{len(jobs)}] {job.suite} {job.model} load {job.load} seed "
                f"{job.seed} {job.variant}: {cpu:.1f} s",
                flush=True,
            )
        for future in scale_futures:
            job, result, cpu = future.result()
            scale.append(Run(job, result))
            cpu_s += cpu
            print(f"  scale {job.policy} load {job.load}: {result['wall_s']:.0f} s", flush=True)
    wall_s = time.perf_counter() - started
    native = {m: native_load("azure", m, 0, 0) for m in args.models}
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "native_load": native,
                    "runs": [{"job": asdict(r.job), **r.result} for r in runs],
                    "scale": [{"job": asdict(r.job), **r.result} for r in scale],
                },
                indent=1,
            )
            + "\n"
        )
    timing = (
        f"at commit {commit} in {wall_s:.0f} s of wall time on {args.jobs} processes "
        f"({cpu_s:.0f} CPU-seconds, {len(runs) + len(scale)} simulations; {machine()})"
    )
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    if not _shaped(sys.argv[1:] if argv is None else argv):
        times["quick" if args.quick else "full"] = timing
        TIMES.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")
    write_markdown(Path(args.out), runs, scale, native, SCENARIOS, args, timing, times)
    print(f"wrote {args.out}: {wall_s:.0f} s wall, {cpu_s:.0f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
