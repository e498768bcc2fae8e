"""`pecsched replay`: replay Azure traces against a live cluster and report the simulator's metrics.

Lengths: prompts at or above `--long-threshold-tokens` in the trace are the trace's long
requests; `--long-rescale LOW:HIGH` spreads them by rank over [LOW, HIGH] tokens (what this
cluster can hold, like the paper's rescaling into [100K, 500K]); every other prompt and every
output length is multiplied by `--token-scale`. Then everything is clamped to what the cluster
serves (`--max-prompt-tokens`, `--max-output-tokens`, and the KV capacity of the instances the
cluster reports). Prompts are seeded pseudo-random token ids in [1, 256), valid for any model.

Metrics are those of `sim/metrics.py`, on the control plane's timestamps; the request class is
the one the control plane assigned. The JSON has the schema of `pecsched sim --json` (one
result, named after the cluster's policy) plus a `live` object with the colocation and KV
transfer counters and per-class rows. A live run has no isolated-JCT reference, so its
starvation rate counts only long requests that did not finish. The cluster counters, the
capacity clamp and the GPU idle rate come from Watch, which needs an admin API key; with a
client key they are reported as unavailable (null).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pecsched.loadgen import PlannedRequest, ReplayOutcome
    from pecsched.replay_report import ReplayReport
    from sdk.types import ClusterSnapshot
    from sim.metrics import RequestRecords
    from sim.workloads import Workload

PROMPT_TOKEN_RANGE = (1, 256)  # token ids of generated prompts: valid for every model's vocab


@dataclass(frozen=True, slots=True)
class LengthPlan:
    """How trace lengths become the lengths sent to the cluster."""

    token_scale: float  # multiplies short prompts and all outputs
    long_threshold_tokens: int  # trace prompts at or above this are the trace's long ones
    long_rescale: tuple[int, int] | None  # spread trace-long prompts over [low, high] tokens
    max_prompt_tokens: int | None  # longest prompt sent
    max_output_tokens: int | None  # most new tokens asked for
    max_short_total_tokens: int | None  # prompt + output of a trace-short request, at most
    max_long_total_tokens: int | None  # prompt + output of a trace-long request, at most

    def __post_init__(self) -> None:
        if not (math.isfinite(self.token_scale) and self.token_scale > 0):
            raise ValueError(f"--token-scale must be > 0, got {self.token_scale}")
        if self.long_threshold_tokens < 1:
            raise ValueError(
                f"--long-threshold-tokens must be >= 1, got {self.long_threshold_tokens}"
            )
        if self.long_rescale is not None and not 1 <= self.long_rescale[0] <= self.long_rescale[1]:
            raise ValueError(f"--long-rescale needs 1 <= LOW <= HIGH, got {self.long_rescale}")


def parse_low_high(text: str, flag: str) -> tuple[int, int]:
    """ "LOW:HIGH" -> (LOW, HIGH); ValueError names the flag."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{flag}: expected LOW:HIGH, got {text!r}") from None
    return low, high


def scale_lengths(workload: Workload, plan: LengthPlan) -> Workload:
    """The workload with `plan` applied to its prompt and output lengths (arrivals unchanged)."""
    import numpy as np

    from sim.workloads import Workload

    prompt = workload.prompt_tokens.astype(np.float64)
    is_long = workload.prompt_tokens >= plan.long_threshold_tokens
    scaled = np.rint(prompt * plan.token_scale)
    if plan.long_rescale is not None and is_long.any():
        low, high = plan.long_rescale
        values = prompt[is_long]
        order = np.sort(values)
        # Mean rank of each value among the long prompts (ties share it), mapped onto [low, high].
        rank = np.searchsorted(order, values, "left") + np.searchsorted(order, values, "right") - 1
        frac = rank / 2.0 / max(len(values) - 1, 1)
        scaled[is_long] = np.rint(low + frac * (high - low))
    output = np.maximum(np.rint(workload.output_tokens * plan.token_scale), 1)
    if plan.max_output_tokens is not None:
        output = np.minimum(output, plan.max_output_tokens)
    if plan.max_prompt_tokens is not None:
        scaled = np.minimum(scaled, plan.max_prompt_tokens)
    for mask, total in (
        (~is_long, plan.max_short_total_tokens),
        (is_long, plan.max_long_total_tokens),
    ):
        if total is not None:
            # Prompt + output must fit; the output gets at most half of it.
            output[mask] = np.minimum(output[mask], max(total // 2, 1))
            scaled[mask] = np.minimum(scaled[mask], total - output[mask])
    return Workload(
        workload.arrival_s,
        np.maximum(scaled, 1).astype(np.int64),
        output.astype(np.int64),
    )


def capacity_limits(snapshot: ClusterSnapshot) -> tuple[int | None, int | None]:
    """(largest prompt + output one short request can use, the same for a long one) from the
    KV capacity of the instances that are up; None when the cluster reports no instances."""
    from sdk.types import InstanceRole, InstanceState

    up = [i for i in snapshot.instances if i.state is InstanceState.UP]
    general = [i.kv_capacity_tokens for i in up if i.role is InstanceRole.GENERAL]
    decode = [i.kv_capacity_tokens for i in up if i.role is InstanceRole.SHORT_DECODE]
    if not general:
        return None, None
    short_total = min([max(general), *decode])
    return short_total, sum(general)


def length_plan(
    args: argparse.Namespace, short_total: int | None, long_total: int | None
) -> LengthPlan:
    """The LengthPlan of the replay flags in `args` and the cluster's capacity limits."""
    return LengthPlan(
        token_scale=args.token_scale,
        long_threshold_tokens=args.long_threshold_tokens,
        long_rescale=None
        if args.long_rescale is None
        else parse_low_high(args.long_rescale, "--long-rescale"),
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        max_short_total_tokens=short_total,
        max_long_total_tokens=long_total,
    )


def plan_requests(workload: Workload, seed: int) -> list[PlannedRequest]:
    """One PlannedRequest per workload entry, with seeded prompt token ids."""
    import numpy as np

    from pecsched.loadgen import PlannedRequest

    out: list[PlannedRequest] = []
    for index, (arrival, prompt, output) in enumerate(
        zip(workload.arrival_s, workload.prompt_tokens, workload.output_tokens, strict=True)
    ):
        rng = np.random.default_rng([seed, index])
        ids = rng.integers(PROMPT_TOKEN_RANGE[0], PROMPT_TOKEN_RANGE[1], size=int(prompt))
        out.append(PlannedRequest(float(arrival), tuple(int(t) for t in ids), int(output)))
    return out


def records_of(outcome: ReplayOutcome) -> RequestRecords:
    """`sim.metrics.RequestRecords` of the measured requests."""
    import numpy as np

    from sim.metrics import RequestRecords

    rs = outcome.requests

    def col(name: str) -> Any:
        return np.array([getattr(r, name) for r in rs], dtype=np.float64)

    return RequestRecords(
        is_long=np.array([r.is_long for r in rs], dtype=np.bool_),
        arrival_s=col("arrival_s"),
        first_scheduled_s=col("first_scheduled_s"),
        first_token_s=col("first_token_s"),
        finished_s=np.array(
            [r.finished_s if r.state.value == "finished" else math.nan for r in rs],
            dtype=np.float64,
        ),
        output_tokens=np.array([r.output_tokens for r in rs], dtype=np.int64),
        preemptions=np.array([r.preemptions for r in rs], dtype=np.int64),
        isolated_jct_s=np.full(len(rs), math.nan),
    )


def register(subparsers: Any) -> None:
    """Add `replay` to the `pecsched` command."""
    p = subparsers.add_parser(
        "replay",
        help="replay traces against a live cluster and report the simulator's metrics",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--trace",
        action="append",
        required=True,
        metavar="FILE",
        help="Azure trace CSV (repeat to merge by timestamp)",
    )
    add_replay_arguments(p)
    p.add_argument("--target", default="127.0.0.1:50051", help="control plane host:port")
    p.add_argument("--api-key", help="API key of the client")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument(
        "--workload-out",
        metavar="CSV",
        help="write the requests sent (lengths as sent) as an Azure-format trace, for "
        "`pecsched sim --trace CSV --long-rescale none` on the same workload",
    )
    p.set_defaults(handler=_handle)


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    """The workload-shaping flags of `replay` (`up --demo` sets the same fields itself)."""
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply inter-arrival times by F (F < 1 compresses)",
    )
    p.add_argument(
        "--token-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply short prompts and all output lengths by F",
    )
    p.add_argument(
        "--long-threshold-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="trace prompts at or above N tokens are the trace's long ones",
    )
    p.add_argument(
        "--long-rescale",
        metavar="LOW:HIGH",
        help="spread the trace's long prompts by rank over [LOW, HIGH] tokens",
    )
    p.add_argument("--max-prompt-tokens", type=int, metavar="N", help="clamp prompts to N")
    p.add_argument("--max-output-tokens", type=int, metavar="N", help="clamp outputs to N")
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="keep the requests arriving in the first S seconds (after scaling)",
    )
    p.add_argument("--max-requests", type=int, metavar="N", help="keep the first N requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="after the last submit, wait at most S seconds for requests to end",
    )


def replay_options(**fields: Any) -> argparse.Namespace:
    """The replay flags as `pecsched replay` parses them by default, with `fields` set (for
    callers that replay without a command line: `up --demo`, benchmarks)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_replay_arguments(parser)
    options = parser.parse_args([])
    for name, value in fields.items():
        if not hasattr(options, name):
            raise TypeError(f"unknown replay option {name!r}")
        setattr(options, name, value)
    return options


def _handle(args: argparse.Namespace) -> int:
    import asyncio

    from sdk.errors import PecSchedError

    try:
        report = asyncio.run(run_replay(args.trace, args, args.target, args.api_key))
    except (ValueError, OSError, PecSchedError) as exc:
        print(f"pecsched replay: error: {exc}", file=sys.stderr)
        return 2
    print(report.table)
    if args.workload_out:
        from sim.workloads import write_azure_csv

        write_azure_csv(report.workload, args.workload_out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.payload, fh, indent=2)
            fh.write("\n")
    return 0 if report.num_failed == 0 else 1


async def run_replay(
    traces: list[str], args: argparse.Namespace, target: str, api_key: str | None
) -> ReplayReport:
    """Prepare the workload from `traces` and the replay flags in `args`, replay it, report."""
    from pecsched.loadgen import first_snapshot, replay_workload
    from pecsched.replay_report import build_report
    from sdk.aio import AsyncClient
    from sim import workloads as wl

    workload = wl.load_azure_traces(list(traces))
    workload = wl.scale_time(workload, args.time_scale)
    if args.duration is not None:
        workload = wl.head(workload, max(1, int((workload.arrival_s < args.duration).sum())))
    if args.max_requests is not None:
        workload = wl.head(workload, args.max_requests)
    async with AsyncClient(target, api_key=api_key, timeout_s=60.0) as client:
        snapshot = await first_snapshot(client, timeout_s=30.0)
        if snapshot is None:
            print(
                "note: this API key may not Watch the cluster (admin only): no capacity "
                "clamping, and no cluster counters (colocations, KV transfers, GPU idle)",
                file=sys.stderr,
            )
            short_total, long_total = None, None
            policy, num_instances = "unknown", None
        else:
            short_total, long_total = capacity_limits(snapshot)
            policy, num_instances = snapshot.policy, len(snapshot.instances)
        workload = scale_lengths(workload, length_plan(args, short_total, long_total))
        plan = plan_requests(workload, args.seed)
        print(
            f"replaying {len(plan)} requests over {workload.duration_s:.0f} s against {target} "
            f"(policy {policy}); prompts {workload.prompt_tokens.min()}-"
            f"{workload.prompt_tokens.max()} tokens, outputs {workload.output_tokens.min()}-"
            f"{workload.output_tokens.max()}",
            file=sys.stderr,
            flush=True,
        )
        outcome = await replay_workload(client, plan, drain_timeout_s=args.drain_timeout)
    config = {
        "traces": list(traces),
        "target": target,
        "time_scale": args.time_scale,
        "token_scale": args.token_scale,
        "long_threshold_tokens": args.long_threshold_tokens,
        "long_rescale": args.long_rescale,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "max_short_total_tokens": short_total,
        "max_long_total_tokens": long_total,
        "seed": args.seed,
        "num_requests": len(plan),
        "instances": num_instances,
    }
    return build_report(outcome, records_of(outcome), policy, config, workload)
