"""The row layout of `requests`: which columns a view, a new request and an update touch, in
which order, and how core types map to and from those rows (pure: no connection, no I/O).

SqlRepository executes these; recovery reads its thousands of rows by position through
`view_from_row`, so the column tuples here and the row order there are one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controlplane.core.types import RequestClass, RequestSpec, RequestState, RequestView
from controlplane.store import codec
from controlplane.store.records import NewRequest, SamplingParams
from controlplane.store.tables import metadata

REQUESTS = metadata.tables["requests"]
TOKENS = metadata.tables["request_tokens"]
EVENTS = metadata.tables["request_events"]

# Columns a RequestView is built from (the prompt blob is left out).
VIEW_COLUMNS = tuple(
    REQUESTS.c[name]
    for name in (
        "id tenant request_class state prompt_tokens max_new_tokens priority arrival_s "
        "deadline_s first_scheduled_s prefill_done_s first_token_s finished_s chunks_done "
        "chunks_total num_preemptions num_requeues paused_total_s prefill_instance_ids "
        "decode_instance_ids output_tokens error"
    ).split()
)
# Columns of what the data plane needs beyond the view.
INPUT_COLUMNS = tuple(
    REQUESTS.c[name] for name in "prompt_token_ids temperature top_p seed stop_at_eos".split()
)
MUTABLE = (
    "state prefill_done_s finished_s chunks_done chunks_total num_preemptions num_requeues "
    "paused_total_s prefill_instance_ids decode_instance_ids output_tokens error"
).split()
SET_ONCE = ("first_scheduled_s", "first_token_s")
# The columns of `requests` in the order `insert_row` fills them.
INSERT_COLUMNS = tuple(
    "id tenant request_class state prompt_token_ids prompt_tokens max_new_tokens temperature "
    "top_p seed stop_at_eos priority deadline_s idempotency_key output_tokens error "
    "num_preemptions num_requeues paused_total_s prefill_instance_ids decode_instance_ids "
    "chunks_done chunks_total arrival_s first_scheduled_s prefill_done_s first_token_s "
    "finished_s".split()
)
assert INSERT_COLUMNS == tuple(c.name for c in REQUESTS.columns), "a column was added"
# The batch UPDATE of PostgreSQL: one array parameter per column, joined on the id.
UPDATE_ARRAYS = (
    ("id", "text"),
    ("state", "text"),
    ("prefill_done_s", "float8"),
    ("finished_s", "float8"),
    ("chunks_done", "int"),
    ("chunks_total", "int"),
    ("num_preemptions", "int"),
    ("num_requeues", "int"),
    ("paused_total_s", "float8"),
    ("prefill_instance_ids", "text"),
    ("decode_instance_ids", "text"),
    ("output_tokens", "int"),
    ("error", "text"),
    ("first_scheduled_s", "float8"),
    ("first_token_s", "float8"),
)
assert [n for n, _ in UPDATE_ARRAYS] == ["id", *MUTABLE, *SET_ONCE], "every updated column"
PG_UPDATE_SQL = (
    "UPDATE requests SET "
    + ", ".join(
        f"{name} = COALESCE(requests.{name}, u.{name})"
        if name in SET_ONCE
        else f"{name} = u.{name}"
        for name, _ in UPDATE_ARRAYS[1:]
    )
    + " FROM unnest("
    + ", ".join(f"%s::{sql_type}[]" for _, sql_type in UPDATE_ARRAYS)
    + ") AS u("
    + ", ".join(name for name, _ in UPDATE_ARRAYS)
    + ") WHERE requests.id = u.id"
)
EVENT_COLUMNS = ("request_id", "kind", "at_s", "instance_id", "details")
_QUEUED = RequestState.QUEUED.value


def placeholder(dialect: str, column: str) -> str:
    """A positional parameter in the driver's style; blobs go to psycopg in binary (`%b`)."""
    if dialect != "postgresql":
        return "?"
    return "%b" if column == "prompt_token_ids" else "%s"


def insert_row(new: NewRequest) -> tuple[Any, ...]:
    """The row of a new request, in `INSERT_COLUMNS` order."""
    spec = new.spec
    sampling = new.sampling
    return (
        spec.request_id,
        spec.tenant,
        new.request_class.value,
        _QUEUED,
        codec.pack_token_ids(new.prompt_token_ids, "prompt_token_ids"),
        spec.prompt_tokens,
        spec.max_new_tokens,
        sampling.temperature,
        sampling.top_p,
        codec.seed_to_db(sampling.seed),
        sampling.stop_at_eos,
        spec.priority,
        spec.deadline_s,
        new.idempotency_key,
        0,  # output_tokens
        None,  # error
        0,  # num_preemptions
        0,  # num_requeues
        0.0,  # paused_total_s
        "",  # prefill_instance_ids
        "",  # decode_instance_ids
        0,  # chunks_done
        0,  # chunks_total
        spec.arrival_s,
        None,  # first_scheduled_s
        None,  # prefill_done_s
        None,  # first_token_s
        None,  # finished_s
    )


def queued_view(new: NewRequest) -> RequestView:
    return RequestView(new.spec, new.request_class, RequestState.QUEUED)


def update_params(view: RequestView) -> dict[str, Any]:
    return {
        "b_id": view.request_id,
        "b_state": view.state.value,
        "b_first_scheduled_s": view.first_scheduled_s,
        "b_prefill_done_s": view.prefill_done_s,
        "b_first_token_s": view.first_token_s,
        "b_finished_s": view.finished_s,
        "b_chunks_done": view.chunks_done,
        "b_chunks_total": view.chunks_total,
        "b_num_preemptions": view.num_preemptions,
        "b_num_requeues": view.num_requeues,
        "b_paused_total_s": view.paused_total_s,
        "b_prefill_instance_ids": codec.join_ids(view.prefill_instance_ids, "prefill_instance_ids"),
        "b_decode_instance_ids": codec.join_ids(view.decode_instance_ids, "decode_instance_ids"),
        "b_output_tokens": view.output_tokens,
        "b_error": view.error or None,
    }


def sampling_from_row(row: Any) -> SamplingParams:
    return SamplingParams(row.temperature, row.top_p, codec.seed_from_db(row.seed), row.stop_at_eos)


_CLASSES = {c.value: c for c in RequestClass}
_STATES = {s.value: s for s in RequestState}


def view_from_row(row: Sequence[Any]) -> RequestView:
    """The view of a row whose first columns are `VIEW_COLUMNS` (read by position: recovery
    builds one per unfinished request)."""
    (
        request_id,
        tenant,
        request_class,
        state,
        prompt_tokens,
        max_new_tokens,
        priority,
        arrival_s,
        deadline_s,
        first_scheduled_s,
        prefill_done_s,
        first_token_s,
        finished_s,
        chunks_done,
        chunks_total,
        num_preemptions,
        num_requeues,
        paused_total_s,
        prefill_instance_ids,
        decode_instance_ids,
        output_tokens,
        error,
    ) = row[: len(VIEW_COLUMNS)]
    spec = RequestSpec(
        request_id, tenant, prompt_tokens, max_new_tokens, priority, arrival_s, deadline_s
    )
    return RequestView(
        spec=spec,
        request_class=_CLASSES[request_class],
        state=_STATES[state],
        first_scheduled_s=first_scheduled_s,
        prefill_done_s=prefill_done_s,
        first_token_s=first_token_s,
        finished_s=finished_s,
        chunks_done=chunks_done,
        chunks_total=chunks_total,
        num_preemptions=num_preemptions,
        num_requeues=num_requeues,
        paused_total_s=paused_total_s,
        prefill_instance_ids=codec.split_ids(prefill_instance_ids),
        decode_instance_ids=codec.split_ids(decode_instance_ids),
        output_tokens=output_tokens,
        error=error or "",
    )
