"""Admin SQL views: request_history and request_timeline."""

from __future__ import annotations

from alembic import op

revision = "5876f467fb1b"
down_revision = "f474c8b2c22d"
branch_labels = None
depends_on = None

# Dialect-specific fragments; everything else in the views is portable SQL.
# `arrival_at` / `at`: a readable timestamp (UTC) of an epoch-seconds column.
_TIMESTAMP = {
    "postgresql": "to_timestamp({column})",
    "sqlite": "strftime('%Y-%m-%d %H:%M:%f', {column}, 'unixepoch')",
}
# `instances`: the distinct instances a request's timeline mentions, sorted, comma-separated.
_INSTANCES = {
    "postgresql": (
        "(SELECT string_agg(DISTINCT e.instance_id, ',' ORDER BY e.instance_id)"
        " FROM request_events e WHERE e.request_id = r.id)"
    ),
    "sqlite": (
        "(SELECT group_concat(instance_id, ',') FROM (SELECT DISTINCT e.instance_id"
        " FROM request_events e WHERE e.request_id = r.id AND e.instance_id IS NOT NULL"
        " ORDER BY e.instance_id))"
    ),
}

_REQUEST_HISTORY = """
CREATE VIEW request_history AS
SELECT
    r.id AS request_id,
    r.tenant,
    r.request_class,
    r.state,
    r.priority,
    r.prompt_tokens,
    r.output_tokens,
    r.max_new_tokens,
    r.arrival_s,
    {arrival_at} AS arrival_at,
    r.first_scheduled_s - r.arrival_s AS queueing_delay_s,
    r.prefill_done_s - r.first_scheduled_s AS prefill_s,
    r.first_token_s - r.arrival_s AS ttft_s,
    r.finished_s - r.arrival_s AS jct_s,
    CASE WHEN r.output_tokens > 1
        THEN (r.finished_s - r.first_token_s) / (r.output_tokens - 1) END AS mean_tbt_s,
    r.num_preemptions AS preemptions,
    r.num_requeues AS requeues,
    r.paused_total_s,
    {instances} AS instances,
    r.error
FROM requests r
"""

_REQUEST_TIMELINE = """
CREATE VIEW request_timeline AS
SELECT
    e.request_id,
    e.id AS event_id,
    r.tenant,
    r.request_class,
    e.kind,
    e.at_s,
    {at} AS at,
    e.at_s - r.arrival_s AS since_arrival_s,
    e.instance_id,
    e.details
FROM request_events e
JOIN requests r ON r.id = e.request_id
"""


def upgrade() -> None:
    """Create the admin views."""
    dialect = op.get_context().dialect.name
    timestamp = _TIMESTAMP[dialect]
    op.execute(
        _REQUEST_HISTORY.format(
            arrival_at=timestamp.format(column="r.arrival_s"), instances=_INSTANCES[dialect]
        )
    )
    op.execute(_REQUEST_TIMELINE.format(at=timestamp.format(column="e.at_s")))


def downgrade() -> None:
    """Drop the admin views."""
    op.execute("DROP VIEW request_timeline")
    op.execute("DROP VIEW request_history")
