"""Turn a live replay's measurements into the simulator's metrics, a per-class table and JSON.

The metrics come from `sim.metrics.summarize` on the measured records, and the JSON result from
`sim.report.result_to_dict`, so a live run and a simulated one are compared field by field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pecsched.loadgen import ClusterCounters, ReplayOutcome
from sdk.types import RequestState
from sim.metrics import (
    FloatArray,
    RequestRecords,
    Summary,
    percentiles,
    queueing_delay_s,
    summarize,
    tbt_s,
)
from sim.report import PolicyResult, result_to_dict
from sim.workloads import Workload

_P50_P99 = (50, 99)


@dataclass(frozen=True, slots=True)
class ClassRow:
    """One request class's row of the table (seconds; NaN when nothing to measure)."""

    name: str  # "short" or "long"
    count: int  # requests of the class
    num_finished: int
    queueing_delay_s: dict[str, float]  # p50, p99 (unscheduled: end - arrival)
    ttft_s: dict[str, float]  # p50, p99 over requests with a first token
    tbt_s: dict[str, float]  # p50, p99 of per-request mean TBT
    jct_s: dict[str, float]  # p50, p99 over finished requests
    preemptions: int  # pauses of the class's prefills


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay prints and writes."""

    table: str  # per-class table and cluster counters
    payload: dict[str, Any]  # the JSON document
    num_failed: int  # requests that did not finish (failed, cancelled, unfinished, refused)
    workload: Workload  # the requests sent, lengths as sent (after scaling and clamping)
    rows: tuple[ClassRow, ClassRow]  # the table's short and long rows
    counters: ClusterCounters  # preemptions, colocations, KV transfers during the replay
    short_queueing_delay_s: FloatArray  # each short's (never scheduled: end of run - arrival)


def class_rows(records: RequestRecords, end_s: float) -> tuple[ClassRow, ClassRow]:
    """The short and the long row, with the definitions of `sim.metrics`."""
    rows: list[ClassRow] = []
    done = ~np.isnan(records.finished_s)
    started = ~np.isnan(records.first_token_s)
    for name, mask in (("short", ~records.is_long), ("long", records.is_long)):
        rows.append(
            ClassRow(
                name=name,
                count=int(mask.sum()),
                num_finished=int((mask & done).sum()),
                queueing_delay_s=percentiles(queueing_delay_s(records, mask, end_s), _P50_P99),
                ttft_s=percentiles(
                    (records.first_token_s - records.arrival_s)[mask & started], _P50_P99
                ),
                tbt_s=percentiles(tbt_s(records, mask), _P50_P99),
                jct_s=percentiles((records.finished_s - records.arrival_s)[mask & done], _P50_P99),
                preemptions=int(records.preemptions[mask].sum()),
            )
        )
    return rows[0], rows[1]


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _json_num(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_table(rows: tuple[ClassRow, ...], footer: str) -> str:
    """A fixed-width per-class table followed by `footer`."""
    header = (
        f"{'class':<6} {'reqs':>5} {'done':>5} {'qd p50':>8} {'qd p99':>8} {'ttft p50':>9} "
        f"{'ttft p99':>9} {'tbt p50':>8} {'jct p50':>8} {'jct p99':>8} {'preempt':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<6} {r.count:>5} {r.num_finished:>5} {_fmt(r.queueing_delay_s['p50']):>8} "
            f"{_fmt(r.queueing_delay_s['p99']):>8} {_fmt(r.ttft_s['p50']):>9} "
            f"{_fmt(r.ttft_s['p99']):>9} {_fmt(r.tbt_s['p50']):>8} {_fmt(r.jct_s['p50']):>8} "
            f"{_fmt(r.jct_s['p99']):>8} {r.preemptions:>7}"
        )
    lines.append(footer)
    lines.append("qd = queueing delay (arrival -> first scheduled), seconds on the control plane")
    return "\n".join(lines)


def build_report(
    outcome: ReplayOutcome,
    records: RequestRecords,
    policy: str,
    config: dict[str, Any],
    workload: Workload,
) -> ReplayReport:
    """The table and JSON document of one replay of `workload` against a cluster running
    `policy`."""
    counters = outcome.counters
    finished = [r.finished_s for r in outcome.requests if not math.isnan(r.finished_s)]
    end_s = max([counters.last_at_s, *finished])
    summary = summarize(records, counters.busy_gpu_s, counters.num_gpus, end_s)
    rows = class_rows(records, end_s)
    states = [r.state for r in outcome.requests]
    num_state = {s: states.count(s) for s in RequestState}
    num_failed = len(states) - num_state[RequestState.FINISHED] + outcome.num_submit_errors
    result = result_to_dict(PolicyResult(policy, summary, outcome.wall_s, 0, 0.0, 0))
    if not counters.is_available:
        result["gpu_idle_rate"] = None
    result["live"] = _live_json(outcome, rows, num_state)
    payload = {"config": {**config, "policies": [policy]}, "results": [result]}
    return ReplayReport(
        table=format_table(rows, _footer(outcome, summary, policy, num_failed)),
        payload=payload,
        num_failed=num_failed,
        workload=workload,
        rows=rows,
        counters=counters,
        short_queueing_delay_s=queueing_delay_s(records, ~records.is_long, end_s),
    )


def _footer(outcome: ReplayOutcome, summary: Summary, policy: str, num_failed: int) -> str:
    """The table's last line: the cluster counters, short throughput, makespan, failures."""
    counters = outcome.counters
    if counters.is_available:
        cluster = (
            f"{counters.preemptions} preemptions, {counters.colocations} colocations, "
            f"{counters.kv_transfers} KV transfers; GPU idle {summary.gpu_idle_rate:.0%}"
        )
    else:
        cluster = "cluster counters unavailable (Watch needs an admin API key)"
    footer = (
        f"policy {policy}: {cluster}; short throughput {summary.short.throughput_rps:.2f} "
        f"req/s; makespan {summary.makespan_s:.1f} s; not finished: {num_failed}"
    )
    if outcome.first_submit_error:
        footer += f" (first refused submit: {outcome.first_submit_error})"
    return footer


def _live_json(
    outcome: ReplayOutcome, rows: tuple[ClassRow, ClassRow], num_state: dict[RequestState, int]
) -> dict[str, Any]:
    """The result's `live` object: cluster counters (null without Watch), request outcomes
    (`num_state`: requests per final state) and the per-class rows (NaN -> null)."""
    counters = outcome.counters
    known = counters.is_available
    return {
        "colocations_total": counters.colocations if known else None,
        "kv_transfers_total": counters.kv_transfers if known else None,
        "preemptions_counter": counters.preemptions if known else None,
        "busy_gpu_s": counters.busy_gpu_s if known else None,
        "num_gpus": counters.num_gpus if known else None,
        "finished": num_state[RequestState.FINISHED],
        "cancelled": num_state[RequestState.CANCELLED],
        "failed": num_state[RequestState.FAILED],
        "unfinished": sum(1 for r in outcome.requests if not r.state.is_terminal),
        "submit_errors": outcome.num_submit_errors,
        "classes": {
            r.name: {
                "count": r.count,
                "finished": r.num_finished,
                "queueing_delay_s": {k: _json_num(v) for k, v in r.queueing_delay_s.items()},
                "ttft_s": {k: _json_num(v) for k, v in r.ttft_s.items()},
                "tbt_s": {k: _json_num(v) for k, v in r.tbt_s.items()},
                "jct_s": {k: _json_num(v) for k, v in r.jct_s.items()},
                "preemptions": r.preemptions,
            }
            for r in rows
        },
        "request_ids": [r.request_id for r in outcome.requests],
    }


def _counter(value: int, report: ReplayReport) -> float:
    return float(value) if report.counters.is_available else math.nan


# (label, value of one replay, True when the value is in seconds), in the comparison's order.
_COMPARED: tuple[tuple[str, Callable[[ReplayReport], float], bool], ...] = (
    ("short queueing delay p50 (s)", lambda r: r.rows[0].queueing_delay_s["p50"], True),
    ("short queueing delay p99 (s)", lambda r: r.rows[0].queueing_delay_s["p99"], True),
    ("short TTFT p99 (s)", lambda r: r.rows[0].ttft_s["p99"], True),
    ("short TBT p99 (s)", lambda r: r.rows[0].tbt_s["p99"], True),
    ("long TBT p99 (s)", lambda r: r.rows[1].tbt_s["p99"], True),
    ("long JCT p50 (s)", lambda r: r.rows[1].jct_s["p50"], True),
    ("long JCT p99 (s)", lambda r: r.rows[1].jct_s["p99"], True),
    ("preemptions", lambda r: _counter(r.counters.preemptions, r), False),
    ("colocations", lambda r: _counter(r.counters.colocations, r), False),
    ("KV transfers", lambda r: _counter(r.counters.kv_transfers, r), False),
    ("not finished", lambda r: float(r.num_failed), False),
)


def _change(before: float, after: float, is_seconds: bool) -> str:
    if math.isnan(before) or math.isnan(after):
        return "-"
    if not is_seconds:
        return f"{after - before:+.0f}"
    if before == 0.0:
        return "same" if after == 0.0 else "-"
    return f"{(after - before) / before:+.0%}"


def format_comparison(baseline: tuple[str, ReplayReport], ours: tuple[str, ReplayReport]) -> str:
    """The headline metrics of two replays of the same slice, side by side, with the change
    from `baseline` to `ours` (relative for times, absolute for counts); each is (policy name,
    report)."""
    (base_name, base), (our_name, our) = baseline, ours
    width = max(len(label) for label, _, _ in _COMPARED)
    columns = max(len(base_name), len(our_name), 9)
    header = f"{'':<{width}}  {base_name:>{columns}}  {our_name:>{columns}}  {'change':>7}"
    lines = [header, "-" * len(header)]
    for label, value, is_seconds in _COMPARED:
        before, after = value(base), value(our)
        cells = [
            "-" if math.isnan(v) else (f"{v:.3f}" if is_seconds else f"{v:.0f}")
            for v in (before, after)
        ]
        lines.append(
            f"{label:<{width}}  {cells[0]:>{columns}}  {cells[1]:>{columns}}  "
            f"{_change(before, after, is_seconds):>7}"
        )
    return "\n".join(lines)
