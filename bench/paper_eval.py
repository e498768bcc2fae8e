"""Reproduce the paper's evaluation in the simulator, over several seeds, and write
docs/evaluation.md (tables, plots and targets; nothing in it is edited by hand).

    .venv/bin/python bench/paper_eval.py [--quick] [--jobs N] [--seeds 1,2,3]
        [--models m1,m2] [--loads 0.25,0.5,...] [--scenarios s1,s2] [--max-requests N]
        [--synthetic-requests N] [--skip-scale] [--out docs/evaluation.md] [--json OUT]
        [--shard I/N --json SHARD.json] [--merge SHARD.json ...] [--plan N]

Sharded (a machine lent in calls of a few minutes): `--shard I/N` runs only the I-th of N
shards (jobs dealt longest-first by `estimated_cpu_s` to the least loaded shard) and writes its
raw results to `--json`, no document; `--merge` reads every shard's file (same commit, same
flags) and writes the document, with each shard's machine and wall time; `--plan N` prints each
shard's job count and estimated CPU-seconds, running nothing. The simulation path imports only
numpy and the repository (matplotlib is loaded only to write the document).

Two suites, both on 32 x A100-80GB with the paper's TP:
* azure: the merged one-hour Azure trace, prompts >= 4096 tokens min-max rescaled into
  [100K, 500K] (the paper's setup), for each paper model at several offered prefill loads;
* synthetic: seeded heavy-tail workloads (`sim.workloads.heavy_tail`: log-normal lengths,
  Poisson or bursty arrivals, 5-60% long) on Mistral-7B at several loads.
Every (suite, model, load) point runs under every registered policy and seed: fifo, priority,
pecsched, sarathi; reservation over a sweep of reserve sizes up to all-but-one instance;
distserve over a sweep of decode-instance counts; the PecSched ablations at loads >= 0.5 of
the azure suite. Then a 10,000-GPU run measures the simulator at scale. Runs are independent
and go through a process pool; `paper_eval_doc` writes the document, each missed target with a
sentence generated from the run's own numbers (`paper_eval_explain`).
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

from paper_eval_diag import diagnose  # noqa: E402
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
EXPLAINED = ("pecsched",)  # runs whose decisions are logged for the short-tail breakdown
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
    """Run one simulation: the job, its `pecsched sim --json` result (plus, on 32 GPUs, its
    `diagnosis`: `paper_eval_diag`, from a decision log for the EXPLAINED policies) and its CPU
    seconds."""
    started = time.process_time()
    config = _CONFIG
    if job.knob:
        override: dict[str, Any] = {job.knob: job.knob_value}
        config = replace(config, **override)
    explained = job.policy in EXPLAINED and job.gpus == GPUS_32
    outcome = run_policy(
        workload_of(job),
        ClusterSpec(job.gpus, cost_of(job.model)),
        job.policy,
        config,
        job.seed,
        log_decisions=explained,
        batch_window_s=job.batch_window_s,
    )
    result = result_to_dict(outcome.result)
    if job.gpus == GPUS_32:
        result["diagnosis"] = diagnose(outcome.run.records, outcome.run.decisions)
    return job, result, time.process_time() - started


def sweep(instances: int, fractions: tuple[float, ...]) -> list[int]:
    """Distinct instance counts at `fractions` of `instances`, within [1, instances - 1]."""
    return sorted({min(instances - 1, max(1, round(f * instances))) for f in fractions})


# CPU-seconds per 1,000 requests of one simulation, measured on this 2-core box (AMD EPYC) at
# b/ddb44c0 on full-size jobs (azure: the whole trace at loads 0.25-1.0, Mistral-7B, Yi-34B,
# Llama-3.1-70B; synthetic: 3,000 requests at load 1.5), rounded up; the lent 16-CPU host ran
# the simulator at about the same per-core speed (BENCHMARKS.md)
CPU_S_PER_K_REQUESTS = {
    ("azure", "pecsched"): 0.45,
    ("azure", "sarathi"): 0.36,
    ("azure", "baseline"): 0.2,
    ("synthetic", "pecsched"): 1.7,
    ("synthetic", "sarathi"): 0.4,
    ("synthetic", "baseline"): 0.4,
}
AZURE_REQUESTS = 28_185  # the merged one-hour trace
SCALE_JOB_CPU_S = 170.0  # one 10,000-GPU run (161 s measured on the lent host)


def estimated_cpu_s(job: Job) -> float:
    """Rough CPU-seconds of `job`, to deal jobs to shards (load is ignored: it moves a run's
    cost by less than 2x)."""
    if job.gpus != GPUS_32:
        return SCALE_JOB_CPU_S
    if job.suite == "azure":
        suite, requests = "azure", min(job.max_requests or AZURE_REQUESTS, AZURE_REQUESTS)
    else:
        suite, requests = "synthetic", job.synthetic_requests
    kind = job.policy if job.policy in ("pecsched", "sarathi") else "baseline"
    if job.policy.startswith("pecsched"):
        kind = "pecsched"
    return CPU_S_PER_K_REQUESTS[(suite, kind)] * requests / 1000


def deal(jobs: list[Job], count: int) -> list[list[int]]:
    """Indices of `jobs` per shard: longest first, each to the shard with the least estimated
    CPU so far (lowest shard on ties); deterministic."""
    shards: list[list[int]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for i in sorted(range(len(jobs)), key=lambda i: (-estimated_cpu_s(jobs[i]), i)):
        k = min(range(count), key=lambda k: (totals[k], k))
        shards[k].append(i)
        totals[k] += estimated_cpu_s(jobs[i])
    return shards


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
    """HEAD's short hash, marked `+changes` when the tree differs from it ("unknown" where git
    or the repository's history is missing, e.g. a copied tree: pass --commit there)."""
    git = ["git", "-C", str(REPO)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


TIMES = REPO / "bench" / "results" / "paper_eval_times.json"  # the last full and quick runs


def _shaped(argv: list[str]) -> bool:
    """True when flags other than --quick, --jobs, --out and --json change what runs (such a
    run's time is not the full or quick evaluation's)."""
    free = {"--quick", "--jobs", "--out", "--json"}
    return any(a.startswith("--") and a.split("=")[0] not in free for a in argv)


def shard_spec(text: str) -> tuple[int, int]:
    """Parse `I/N` (1 <= I <= N)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N like 1/3, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"expected 1 <= I <= N, got {text!r}")
    return index, count


_NOT_SHAPE = {"--jobs", "--out", "--json", "--shard", "--merge", "--plan", "--commit"}


def shape_argv(argv: list[str]) -> list[str]:
    """`argv` without the flags that do not change what runs (processes, output paths, the
    shard, and their values): what every shard of one evaluation must share."""
    out: list[str] = []
    dropping = False
    for arg in argv:
        if arg.startswith("--"):
            dropping = arg.split("=")[0] in _NOT_SHAPE and "=" not in arg
            if arg.split("=")[0] not in _NOT_SHAPE:
                out.append(arg)
        elif not dropping:
            out.append(arg)
    return out


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
    ap.add_argument(
        "--shard", type=shard_spec, help="I/N: run only shard I of N (1-based); needs --json"
    )
    ap.add_argument(
        "--commit", help="the commit to record (default: git HEAD here; for a copied tree)"
    )
    ap.add_argument(
        "--merge", nargs="+", metavar="SHARD.json", help="write the document from shards"
    )
    ap.add_argument(
        "--plan", type=int, metavar="N", help="print N shards' estimated CPU, run nothing"
    )
    args = ap.parse_args(argv)
    if args.shard and not args.json:
        ap.error("--shard needs --json (the shard's raw results)")
    if args.merge and (args.shard or args.plan):
        ap.error("--merge takes no --shard or --plan")
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


def run_all(
    jobs: list[Job], scale_jobs: list[Job], processes: int
) -> tuple[list[Run], list[Run], float]:
    """Run every job on `processes` processes: the runs (in `jobs` order), the scale runs and
    the CPU-seconds spent in simulations."""
    cpu_s = 0.0
    print(f"{len(jobs) + len(scale_jobs)} simulations on {processes} processes", flush=True)
    runs: list[Run] = []
    scale: list[Run] = []
    with ProcessPoolExecutor(max_workers=processes) as pool:
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
    return runs, scale, cpu_s


def _raw(runs: list[Run]) -> list[dict[str, Any]]:
    return [{"job": asdict(r.job), **r.result} for r in runs]


def _runs(raw: list[dict[str, Any]]) -> list[Run]:
    return [Run(Job(**r["job"]), {k: v for k, v in r.items() if k != "job"}) for r in raw]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    commit = args.commit or head_commit()  # the code that runs, before anything is written
    jobs, scale_jobs = build_jobs(args)
    if args.plan or args.shard:
        count = args.plan or args.shard[1]
        every = scale_jobs + jobs
        shards = deal(every, count)
        for k, members in enumerate(shards, start=1):
            cpu = sum(estimated_cpu_s(every[i]) for i in members)
            print(f"shard {k}/{count}: {len(members)} simulations, ~{cpu:.0f} CPU-seconds")
        if args.plan:
            return 0
        mine = set(shards[args.shard[0] - 1])
        num_scale = len(scale_jobs)
        scale_jobs = [j for i, j in enumerate(every[:num_scale]) if i in mine]
        jobs = [j for i, j in enumerate(every[num_scale:], start=num_scale) if i in mine]
    started = time.perf_counter()
    runs, scale, cpu_s = run_all(jobs, scale_jobs, args.jobs)
    wall_s = time.perf_counter() - started
    native = {m: native_load("azure", m, 0, 0) for m in args.models}
    if args.shard:
        payload = {
            "commit": commit,
            "machine": machine(),
            "shape": shape_argv(argv),
            "shard": list(args.shard),
            "processes": args.jobs,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "native_load": native,
            "runs": _raw(runs),
            "scale": _raw(scale),
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote shard {args.json}: {wall_s:.0f} s wall, {cpu_s:.0f} s CPU", flush=True)
        return 0
    if args.json:
        payload = {"native_load": native, "runs": _raw(runs), "scale": _raw(scale)}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    timing = (
        f"at commit {commit} in {wall_s:.0f} s of wall time on {args.jobs} processes "
        f"({cpu_s:.0f} CPU-seconds, {len(runs) + len(scale)} simulations; {machine()})"
    )
    command = " ".join(["python bench/paper_eval.py", *shape_argv(argv)])
    if args.jobs:
        command += f" --jobs {args.jobs}"
    write_doc(args, argv, runs, scale, native, timing, command)
    print(f"wrote {args.out}: {wall_s:.0f} s wall, {cpu_s:.0f} s CPU", flush=True)
    return 0


def write_doc(
    args: argparse.Namespace,
    argv: list[str],
    runs: list[Run],
    scale: list[Run],
    native: dict[str, float],
    timing: str,
    command: str,
) -> None:
    """Record the run's time (unless flags changed what runs) and write the document."""
    from paper_eval_doc import write_markdown  # matplotlib: only here

    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    if not _shaped(argv):
        times["quick" if args.quick else "full"] = timing
        TIMES.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")
    write_markdown(Path(args.out), runs, scale, native, SCENARIOS, args, timing, times, command)


def merge(args: argparse.Namespace) -> int:
    """Write the document from every shard's file of one sharded evaluation."""
    shards = [json.loads(Path(f).read_text()) for f in args.merge]
    first = shards[0]
    count = first["shard"][1]
    for f, shard in zip(args.merge, shards, strict=True):
        for key in ("commit", "shape"):
            if shard[key] != first[key]:
                raise SystemExit(f"--merge: {f} has {key} {shard[key]!r}, not {first[key]!r}")
    indices = sorted(shard["shard"][0] for shard in shards)
    if indices != list(range(1, count + 1)) or any(sh["shard"][1] != count for sh in shards):
        raise SystemExit(f"--merge: need shards 1..{count} once each, got {indices}")
    shape = first["shape"]
    shard_args = parse_args(shape)
    jobs, scale_jobs = build_jobs(shard_args)
    order = {json.dumps(asdict(j), sort_keys=True): i for i, j in enumerate(scale_jobs + jobs)}
    runs = sorted(
        (r for sh in shards for r in _runs(sh["runs"])),
        key=lambda r: order[json.dumps(asdict(r.job), sort_keys=True)],
    )
    scale = [r for sh in shards for r in _runs(sh["scale"])]
    if len(runs) + len(scale) != len(order):
        raise SystemExit(f"--merge: {len(runs) + len(scale)} runs, the flags make {len(order)}")
    walls = [sh["wall_s"] for sh in sorted(shards, key=lambda sh: sh["shard"][0])]
    machines = sorted({sh["machine"] for sh in shards})
    processes = sorted({sh["processes"] for sh in shards})
    timing = (
        f"at commit {first['commit']} in {count} shards of {'/'.join(map(str, processes))} "
        f"processes each, {sum(walls):.0f} s of wall time in all (per shard: "
        f"{', '.join(f'{w:.0f}' for w in walls)} s; {sum(sh['cpu_s'] for sh in shards):.0f} "
        f"CPU-seconds, {len(runs) + len(scale)} simulations; {'; '.join(machines)})"
    )
    flags = " ".join(shape)
    command = (
        f"python bench/paper_eval.py {flags} --shard I/{count} --json shard_I.json "
        f"(I = 1..{count}), then python bench/paper_eval.py {flags} --merge shard_*.json"
    ).replace("  ", " ")
    shard_args.out = args.out
    write_doc(shard_args, shape, runs, scale, first["native_load"], timing, command)
    print(f"wrote {args.out} from {count} shards", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
