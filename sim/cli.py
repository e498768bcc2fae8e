"""`pecsched sim`: replay traces through the simulator under one or more policies.

The only module of `sim` that reads files or writes outputs; its flags are in `sim.cli_args`.
Imports only argparse at import time; the simulator loads inside the handler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from sim.cli_args import BASELINE_KNOBS, add_arguments, knob_field, policy_names

if TYPE_CHECKING:
    from controlplane.core.config import SchedulerConfig
    from sim.cost_model import CostModel
    from sim.engine import ClusterSpec
    from sim.report import PolicyResult
    from sim.workloads import Workload


def register(subparsers: Any) -> None:
    """Add the `sim` subcommand to the `pecsched` parser."""
    p = subparsers.add_parser(
        "sim",
        help="simulate a cluster replaying traces under scheduling policies",
        description="Replay Azure LLM traces on a simulated cluster under each policy; print a "
        "table, optionally write JSON and a PNG of paper-style plots.",
    )
    add_arguments(p)
    p.set_defaults(handler=_handle)


def _run_one(
    workload: Workload,
    cluster: ClusterSpec,
    name: str,
    config: SchedulerConfig,
    seed: int,
    slo_s: tuple[float, float],
) -> PolicyResult:
    """One policy's run in a worker process (results are identical to a serial run)."""
    from sim.runner import run_policy

    ttft, tbt = slo_s
    return run_policy(workload, cluster, name, config, seed, slo_ttft_s=ttft, slo_tbt_s=tbt).result


def _handle(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pecsched sim: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from sim.engine import ClusterSpec
    from sim.plots import plot_results
    from sim.report import table

    names = policy_names(args.policy)
    workload = _workload(args)
    cost, model_name, tp, calibration_report = _cost_model(args)
    cluster = ClusterSpec(args.gpus, cost)
    config, knobs = _scheduler_config(args)
    n_long = _num_long(workload, config)
    print(
        f"workload: {len(workload)} requests ({n_long} long) over {workload.duration_s:.0f} s "
        f"({workload.rate_rps:.2f} req/s); cluster: {args.gpus} x {args.gpu}, {model_name} "
        f"tp={tp} ({cluster.num_instances} instances)",
        flush=True,
    )
    seeds: list[int] = args.seeds or [args.seed]
    slo_s = _slo_s(args)
    results = _simulate(workload, cluster, config, names, seeds, slo_s, args.jobs)
    print(table(results))
    if args.json:
        config_out: dict[str, Any] = {
            "traces": args.trace,
            "long_rescale": args.long_rescale,
            "long_rescale_mode": args.long_rescale_mode,
            "time_scale": args.time_scale,
            "rate": args.rate,
            "max_requests": args.max_requests,
            "short_decode_instances": args.short_decode_instances,
            "baseline_knobs": knobs,
            "gpus": args.gpus,
            "gpu": args.gpu,
            "model": model_name,
            "tp": tp,
            "instances": cluster.num_instances,
            "policies": names,
            "seed": seeds[0],
            "seeds": seeds,
            "slo_ttft_s": args.slo_ttft_s,
            "slo_tbt_s": args.slo_tbt_s,
            "num_requests": len(workload),
            "num_long": n_long,
            "efficiency": _efficiency(cost),
            "calibration": calibration_report,
        }
        _write_json(args.json, config_out, results)
    if args.plot:
        title = f"{model_name} on {args.gpus} x {args.gpu}, {len(workload)} requests"
        plot_results(results, args.plot, title)
    return 0


def _workload(args: argparse.Namespace) -> Workload:
    """The trace(s) with the requested rescaling, time scaling and cut (sets `args.trace`
    to the default traces when none was given)."""
    from sim import workloads as wl

    args.trace = args.trace or [str(p) for p in wl.AZURE_TRACES]
    workload = wl.load_azure_traces(args.trace)
    if args.long_rescale != "none":
        try:
            low, high = (int(x) for x in args.long_rescale.split(":"))
        except ValueError:
            raise ValueError(
                f"--long-rescale: expected LOW:HIGH, got {args.long_rescale!r}"
            ) from None
        workload = wl.rescale_long(workload, low, high, args.long_rescale_mode)
    if args.time_scale is not None:
        workload = wl.scale_time(workload, args.time_scale)
    if args.rate is not None:
        workload = wl.set_rate(workload, args.rate)
    if args.max_requests is not None:
        workload = wl.head(workload, args.max_requests)
    return workload


def _cost_model(args: argparse.Namespace) -> tuple[CostModel, str, int, dict[str, Any] | None]:
    """(cost model, model name, tp, calibration report or None): fitted to `--calibration`
    when given (and the fit printed)."""
    from sim.calibration import calibration_error, fit_efficiency, load_calibration
    from sim.cost_model import CostModel
    from sim.hardware import PAPER_TP, gpu_spec, model_shape

    model = model_shape(args.model)
    tp = args.tp if args.tp is not None else PAPER_TP.get(model.name, 1)
    cost = CostModel(model, gpu_spec(args.gpu), tp)
    if not args.calibration:
        return cost, model.name, tp, None
    calibration = load_calibration(args.calibration)
    before = calibration_error(cost, calibration)
    cost = cost.with_efficiency(fit_efficiency(cost, calibration))
    after = calibration_error(cost, calibration)
    report = {
        "file": args.calibration,
        "measured_on": {"gpu": calibration.gpu, "model": calibration.model},
        "efficiency": _efficiency(cost),
        "mean_abs_rel_error_before": before.mean_abs_rel,
        "mean_abs_rel_error_after": after.mean_abs_rel,
        "max_abs_rel_error_after": after.max_abs_rel,
    }
    print(
        f"calibration: fitted mfu={cost.efficiency.mfu:.3f} "
        f"bw_eff={cost.efficiency.bw_eff:.3f} overhead={cost.efficiency.overhead_s * 1e3:.2f} "
        f"ms; mean |error| {before.mean_abs_rel:.1%} -> {after.mean_abs_rel:.1%}"
    )
    return cost, model.name, tp, report


def _efficiency(cost: CostModel) -> dict[str, float]:
    """The cost model's efficiency factors, as written to JSON."""
    eff = cost.efficiency
    return {"mfu": eff.mfu, "bw_eff": eff.bw_eff, "overhead_s": eff.overhead_s}


def _scheduler_config(args: argparse.Namespace) -> tuple[SchedulerConfig, dict[str, int]]:
    """The policies' config from the flags, and the baseline knobs that were set."""
    from controlplane.core.config import SchedulerConfig

    knobs = {
        knob_field(flag): getattr(args, knob_field(flag))
        for flag, _, _ in BASELINE_KNOBS
        if getattr(args, knob_field(flag)) is not None
    }
    config = SchedulerConfig(
        num_long_reserved_instances=args.long_reserved_instances,
        num_short_decode_instances=args.short_decode_instances,
        short_tbt_slo_s=args.short_tbt_slo_s,
        **knobs,
    )
    return config, knobs


def _num_long(workload: Workload, config: SchedulerConfig) -> int:
    """Requests of `workload` the policies classify LONG."""
    from controlplane.core.types import RequestClass, classify

    return sum(
        classify(int(p), config.short_threshold_tokens) is RequestClass.LONG
        for p in workload.prompt_tokens
    )


def _slo_s(args: argparse.Namespace) -> tuple[float, float]:
    """(TTFT, TBT) SLOs, defaults filled into `args`; both must be > 0."""
    from sim.metrics import DEFAULT_SLO_TBT_S, DEFAULT_SLO_TTFT_S

    if args.slo_ttft_s is None:
        args.slo_ttft_s = DEFAULT_SLO_TTFT_S
    if args.slo_tbt_s is None:
        args.slo_tbt_s = DEFAULT_SLO_TBT_S
    if args.slo_ttft_s <= 0 or args.slo_tbt_s <= 0:
        raise ValueError("--slo-ttft-s and --slo-tbt-s must be > 0")
    return (args.slo_ttft_s, args.slo_tbt_s)


def _simulate(
    workload: Workload,
    cluster: ClusterSpec,
    config: SchedulerConfig,
    names: list[str],
    seeds: list[int],
    slo_s: tuple[float, float],
    jobs: int | None,
) -> list[PolicyResult]:
    """Every (policy, seed) run, in parallel processes, results in (policy, seed) order;
    prints each as it completes in that order."""
    runs = [(name, seed) for name in names for seed in seeds]
    workers = max(1, min(len(runs), jobs or os.cpu_count() or 1))
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_run_one, workload, cluster, name, config, seed, slo_s)
            for name, seed in runs
        ]
        for (name, seed), future in zip(runs, futures, strict=True):
            result = future.result()
            results.append(result)
            label = f"{name} seed {seed}" if len(seeds) > 1 else name
            print(
                f"  {label}: simulated {result.summary.makespan_s:.0f} s in {result.wall_s:.1f} s",
                flush=True,
            )
    return results


def _write_json(path: str, config_out: dict[str, Any], results: list[PolicyResult]) -> None:
    """Write the run's config and every result to `path` (indented JSON, newline-terminated)."""
    from sim.report import result_to_dict

    payload = {"config": config_out, "results": [result_to_dict(r) for r in results]}
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
