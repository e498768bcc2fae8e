"""Initial schema: requests, their tokens and events, nodes, instances, API keys."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "f474c8b2c22d"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create every table and index."""
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("created_s", sa.Double(), nullable=False),
        sa.Column("revoked_s", sa.Double(), nullable=True),
        sa.CheckConstraint("role IN ('client', 'admin')", name=op.f("ck_api_keys_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("registered_s", sa.Double(), nullable=False),
        sa.Column("last_heartbeat_s", sa.Double(), nullable=False),
        sa.CheckConstraint("state IN ('up', 'down')", name=op.f("ck_nodes_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("request_class", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("prompt_token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("max_new_tokens", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Double(), nullable=False),
        sa.Column("top_p", sa.Double(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("stop_at_eos", sa.Boolean(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("deadline_s", sa.Double(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("num_preemptions", sa.Integer(), nullable=False),
        sa.Column("num_requeues", sa.Integer(), nullable=False),
        sa.Column("paused_total_s", sa.Double(), nullable=False),
        sa.Column("prefill_instance_ids", sa.Text(), nullable=False),
        sa.Column("decode_instance_ids", sa.Text(), nullable=False),
        sa.Column("chunks_done", sa.Integer(), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=False),
        sa.Column("arrival_s", sa.Double(), nullable=False),
        sa.Column("first_scheduled_s", sa.Double(), nullable=True),
        sa.Column("prefill_done_s", sa.Double(), nullable=True),
        sa.Column("first_token_s", sa.Double(), nullable=True),
        sa.Column("finished_s", sa.Double(), nullable=True),
        sa.CheckConstraint(
            "request_class IN ('short', 'long')", name=op.f("ck_requests_request_class")
        ),
        sa.CheckConstraint(
            "state IN ('queued', 'prefilling', 'paused', 'transferring_kv', 'decoding', 'finished', 'cancelled', 'failed')",
            name=op.f("ck_requests_state"),
        ),
        sa.CheckConstraint(
            "prompt_tokens > 0 AND max_new_tokens > 0", name=op.f("ck_requests_token_counts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
        sa.UniqueConstraint(
            "tenant", "idempotency_key", name=op.f("uq_requests_tenant_idempotency_key")
        ),
    )
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_requests_arrival_s_id"), ["arrival_s", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_requests_request_class_state"), ["request_class", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_requests_tenant_arrival_s_id"),
            ["tenant", "arrival_s", "id"],
            unique=False,
        )
        batch_op.create_index(
            "ix_requests_unfinished",
            ["arrival_s", "id"],
            unique=False,
            sqlite_where=sa.text("NOT (state IN ('finished', 'cancelled', 'failed'))"),
            postgresql_where=sa.text("NOT (state IN ('finished', 'cancelled', 'failed'))"),
        )

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("tp", sa.Integer(), nullable=False),
        sa.Column("device_indices", sa.String(length=256), nullable=False),
        sa.Column("kv_capacity_tokens", sa.BigInteger(), nullable=False),
        sa.Column("updated_s", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "role IN ('general', 'short_decode', 'long_reserved')", name=op.f("ck_instances_role")
        ),
        sa.CheckConstraint("state IN ('up', 'draining', 'down')", name=op.f("ck_instances_state")),
        sa.CheckConstraint("tp > 0", name=op.f("ck_instances_tp")),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_instances_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_node_id"), ["node_id"], unique=False)

    op.create_table(
        "request_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at_s", sa.Double(), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name=op.f("fk_request_events_request_id_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_events")),
    )
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_request_events_request_id_id"), ["request_id", "id"], unique=False
        )

    op.create_table(
        "request_tokens",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("start_index", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name=op.f("fk_request_tokens_request_id_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "start_index", name=op.f("pk_request_tokens")),
    )


def downgrade() -> None:
    """Drop every table (children first)."""
    op.drop_table("request_tokens")
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_request_events_request_id_id"))

    op.drop_table("request_events")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_node_id"))

    op.drop_table("instances")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_requests_unfinished",
            sqlite_where=sa.text("NOT (state IN ('finished', 'cancelled', 'failed'))"),
            postgresql_where=sa.text("NOT (state IN ('finished', 'cancelled', 'failed'))"),
        )
        batch_op.drop_index(batch_op.f("ix_requests_tenant_arrival_s_id"))
        batch_op.drop_index(batch_op.f("ix_requests_request_class_state"))
        batch_op.drop_index(batch_op.f("ix_requests_arrival_s_id"))

    op.drop_table("requests")
    op.drop_table("nodes")
    op.drop_table("api_keys")
