"""Text and JSON renderings of the SDK's values for the client CLI (pure functions, no I/O)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sdk.types import ClusterSnapshot, RequestInfo


def to_jsonable(value: Any) -> Any:
    """`value` as JSON-ready data: dataclasses -> dicts, enums -> values, datetimes -> ISO."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [to_jsonable(item) for item in value]
    return value


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _time(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def format_request(info: RequestInfo) -> str:
    """One request, a field per line (the `pecsched status` view)."""
    ts = info.timestamps
    lines = [
        ("request_id", info.request_id),
        ("state", info.state.value),
        ("class", info.request_class.value),
        ("tenant", info.tenant or "-"),
        ("priority", info.priority),
        ("prompt_tokens", info.prompt_tokens),
        ("output_tokens", f"{info.output_tokens}/{info.max_new_tokens}"),
        ("prefill_chunks", f"{info.chunks_done}/{info.chunks_total}"),
        ("preemptions", info.preemptions),
        ("instances", ",".join(info.instance_ids) or "-"),
        ("arrival", _time(ts.arrival)),
        ("first_scheduled", _time(ts.first_scheduled)),
        ("prefill_done", _time(ts.prefill_done)),
        ("first_token", _time(ts.first_token)),
        ("finished", _time(ts.finished)),
        ("deadline", _time(info.deadline)),
    ]
    if info.error:
        lines.append(("error", info.error))
    return "\n".join(f"{name:<16} {value}" for name, value in lines)


def format_request_table(infos: Sequence[RequestInfo]) -> str:
    """Requests as a table (the `pecsched list` view)."""
    return table(
        ["REQUEST", "STATE", "CLASS", "TENANT", "PROMPT", "OUTPUT", "PREEMPT", "ARRIVAL"],
        [
            [
                i.request_id,
                i.state.value,
                i.request_class.value,
                i.tenant or "-",
                i.prompt_tokens,
                f"{i.output_tokens}/{i.max_new_tokens}",
                i.preemptions,
                _time(i.timestamps.arrival),
            ]
            for i in infos
        ],
    )


def format_snapshot(snapshot: ClusterSnapshot) -> str:
    """Queues by class, instances and what they run, counters (the `pecsched top` view)."""
    header = (
        f"policy {snapshot.policy or '-'}   at {_time(snapshot.at)} UTC\n"
        f"throughput {snapshot.throughput_rps:.2f} req/s   "
        f"preemptions {snapshot.num_preemptions_total}   "
        f"colocations {snapshot.num_colocations_total}   "
        f"kv transfers {snapshot.num_kv_transfers_total}"
    )
    classes = table(
        ["CLASS", "QUEUED", "QUEUED_TOKENS", "PREFILL", "PAUSED", "KV_XFER", "DECODE", "FINISHED"],
        [
            [
                c.request_class.value,
                c.num_queued,
                c.num_queued_tokens,
                c.num_prefilling,
                c.num_paused,
                c.num_transferring_kv,
                c.num_decoding,
                c.num_finished_total,
            ]
            for c in snapshot.classes
        ],
    )
    instances = table(
        ["INSTANCE", "NODE", "ROLE", "STATE", "TP", "KV_USED/CAP", "REQUESTS"],
        [
            [
                i.instance_id,
                i.node_id,
                i.role.value,
                i.state.value,
                i.tp,
                f"{i.kv_used_tokens}/{i.kv_capacity_tokens}",
                ",".join(i.request_ids) or "-",
            ]
            for i in snapshot.instances
        ],
    )
    return f"{header}\n\n{classes}\n\n{instances}"


def fit_screen(text: str, columns: int, lines: int) -> str:
    """`text` cut to a `columns` x `lines` screen: long lines are clipped, and when there are
    more lines than fit, the last screen line says how many were left out. No trailing newline,
    so writing it from the top-left corner never scrolls the terminal."""
    rows = [row[:columns] for row in text.split("\n")]
    if len(rows) > lines:
        kept = max(lines - 1, 0)
        rows = [*rows[:kept], f"... {len(rows) - kept} more lines (enlarge the terminal)"[:columns]]
    return "\n".join(rows)
