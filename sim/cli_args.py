"""The flags of `pecsched sim` and how their values parse (no I/O; imports only argparse)."""

from __future__ import annotations

import argparse

MAIN_POLICIES = ("fifo", "reservation", "priority", "pecsched")
ABLATIONS = ("pecsched-no-preempt", "pecsched-no-disagg", "pecsched-no-coloc", "pecsched-ring")
# the baselines' knobs: (flag, metavar, help); each sets the SchedulerConfig field of its name
BASELINE_KNOBS = (
    (
        "--sarathi-batch-tokens",
        "N",
        "sarathi: tokens per iteration, decodes + prefill chunks (vLLM max_num_batched_tokens; "
        "default 2048)",
    ),
    (
        "--sarathi-long-prefill-tokens",
        "N",
        "sarathi: most tokens per iteration of a prompt longer than N (vLLM "
        "long_prefill_token_threshold; default 512)",
    ),
    (
        "--sarathi-max-partial-prefills",
        "N",
        "sarathi: prefills in flight per instance (vLLM max_num_partial_prefills; default 4)",
    ),
    (
        "--sarathi-max-long-partial-prefills",
        "N",
        "sarathi: LONG prefills in flight per instance (vLLM max_long_partial_prefills; default 1)",
    ),
    (
        "--distserve-decode-instances",
        "N",
        "distserve: decode instances, 1 to all but one (default: 1/16 of the GPUs, at least one)",
    ),
)


def knob_field(flag: str) -> str:
    """The SchedulerConfig field a BASELINE_KNOBS flag sets (`--a-b` -> `a_b`)."""
    return flag.removeprefix("--").replace("-", "_")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add every `pecsched sim` flag to `p`, in `--help` order."""
    _add_workload_args(p)
    _add_cluster_args(p)
    _add_policy_args(p)
    _add_output_args(p)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    """Which traces, how they are rescaled, scaled in time and cut."""
    p.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        help="Azure trace CSV (repeat to merge by timestamp); default: both bundled Azure 2023 "
        "traces (code + conversation)",
    )
    p.add_argument(
        "--long-rescale",
        default="100000:500000",
        metavar="LOW:HIGH",
        help="map prompts >= 4096 tokens into [LOW, HIGH] ('none' keeps them)",
    )
    p.add_argument("--long-rescale-mode", choices=("minmax", "quantile"), default="minmax")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--time-scale",
        type=float,
        metavar="F",
        help="multiply inter-arrival times by F (F < 1 compresses)",
    )
    scale.add_argument("--rate", type=float, metavar="R", help="target mean arrival rate (req/s)")
    p.add_argument("--max-requests", type=int, metavar="N", help="keep the first N requests")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The simulated cluster: GPUs, GPU type, model and tensor parallelism."""
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    p.add_argument("--gpu", required=True, help="GPU type: a100 or h100")
    p.add_argument(
        "--model",
        required=True,
        help="mistral-7b, phi-3-14b, yi-34b, llama-3.1-70b, llama-3-8b, llama-3.2-1b",
    )
    p.add_argument("--tp", type=int, help="GPUs per instance (default: the paper's TP)")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """The policies, their knobs, the seeds and the SLOs they are judged by."""
    p.add_argument(
        "--policy",
        required=True,
        help="comma-separated policy names, or 'all' (the four policies) or 'all+ablations'",
    )
    p.add_argument(
        "--long-reserved-instances",
        type=int,
        metavar="N",
        help="reservation: instances kept for long requests (default: sized for "
        "the longest request)",
    )
    p.add_argument(
        "--short-decode-instances",
        type=int,
        metavar="N",
        help="pecsched: exactly N short-decode instances (default: the paper's GPU share), "
        "e.g. to match a live cluster's roles",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="the policies' tie-break seed")
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        metavar="S1,S2,...",
        help="run every policy once per seed (results carry `seed`)",
    )
    p.add_argument(
        "--slo-ttft-s",
        type=float,
        metavar="S",
        help="SLO attainment: a short's time to first token within S (default 1)",
    )
    p.add_argument(
        "--slo-tbt-s",
        type=float,
        metavar="S",
        help="SLO attainment: a short's per-request p99 time between tokens within S (default 0.1)",
    )
    p.add_argument(
        "--short-tbt-slo-s",
        type=float,
        default=0.1,
        metavar="S",
        help="pecsched: short decodes' time-between-tokens target; the short-decode pool "
        "keeps the instances that meet it (default 0.1)",
    )
    for flag, metavar, text in BASELINE_KNOBS:
        p.add_argument(flag, type=int, metavar=metavar, help=text)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Parallelism, calibration input and the output files."""
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="policies simulated in parallel processes (default: one per CPU)",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="measured iteration times (JSON) to fit the cost model to",
    )
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write paper-style plots")


def seed_list(spec: str) -> list[int]:
    """Parse a --seeds value: distinct comma-separated integers."""
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3, got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers like 1,2,3, got {spec!r}")
    return seeds


def policy_names(spec: str) -> list[str]:
    """Expand a --policy value into registry names, in order."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            names += MAIN_POLICIES
        elif part == "all+ablations":
            names += MAIN_POLICIES + ABLATIONS
        elif part:
            names.append(part)
    if not names:
        raise ValueError("--policy: no policy named")
    return list(dict.fromkeys(names))
