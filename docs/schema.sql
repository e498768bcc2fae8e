-- PecSched control-plane schema on PostgreSQL: the SQL `pecsched db upgrade` runs on an
-- empty database (generated from migrations/; do not edit).
-- Regenerate: .venv/bin/python -m controlplane.store.schema_snapshot > docs/schema.sql

BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> f474c8b2c22d

CREATE TABLE api_keys (
    id VARCHAR(32) NOT NULL,
    key_sha256 VARCHAR(64) NOT NULL,
    role VARCHAR(16) NOT NULL,
    tenant VARCHAR(128) NOT NULL,
    created_s DOUBLE PRECISION NOT NULL,
    revoked_s DOUBLE PRECISION,
    CONSTRAINT pk_api_keys PRIMARY KEY (id),
    CONSTRAINT ck_api_keys_role CHECK (role IN ('client', 'admin'))
);

CREATE TABLE nodes (
    id VARCHAR(64) NOT NULL,
    address VARCHAR(256) NOT NULL,
    state VARCHAR(16) NOT NULL,
    registered_s DOUBLE PRECISION NOT NULL,
    last_heartbeat_s DOUBLE PRECISION NOT NULL,
    CONSTRAINT pk_nodes PRIMARY KEY (id),
    CONSTRAINT ck_nodes_state CHECK (state IN ('up', 'down'))
);

CREATE TABLE requests (
    id VARCHAR(64) NOT NULL,
    tenant VARCHAR(128) NOT NULL,
    request_class VARCHAR(16) NOT NULL,
    state VARCHAR(24) NOT NULL,
    prompt_token_ids BYTEA NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    max_new_tokens INTEGER NOT NULL,
    temperature DOUBLE PRECISION NOT NULL,
    top_p DOUBLE PRECISION NOT NULL,
    seed BIGINT NOT NULL,
    stop_at_eos BOOLEAN NOT NULL,
    priority INTEGER NOT NULL,
    deadline_s DOUBLE PRECISION,
    idempotency_key VARCHAR(128),
    output_tokens INTEGER NOT NULL,
    error TEXT,
    num_preemptions INTEGER NOT NULL,
    num_requeues INTEGER NOT NULL,
    paused_total_s DOUBLE PRECISION NOT NULL,
    prefill_instance_ids TEXT NOT NULL,
    decode_instance_ids TEXT NOT NULL,
    chunks_done INTEGER NOT NULL,
    chunks_total INTEGER NOT NULL,
    arrival_s DOUBLE PRECISION NOT NULL,
    first_scheduled_s DOUBLE PRECISION,
    prefill_done_s DOUBLE PRECISION,
    first_token_s DOUBLE PRECISION,
    finished_s DOUBLE PRECISION,
    CONSTRAINT pk_requests PRIMARY KEY (id),
    CONSTRAINT ck_requests_request_class CHECK (request_class IN ('short', 'long')),
    CONSTRAINT ck_requests_state CHECK (state IN ('queued', 'prefilling', 'paused', 'transferring_kv', 'decoding', 'finished', 'cancelled', 'failed')),
    CONSTRAINT ck_requests_token_counts CHECK (prompt_tokens > 0 AND max_new_tokens > 0),
    CONSTRAINT uq_requests_tenant_idempotency_key UNIQUE (tenant, idempotency_key)
);

CREATE INDEX ix_requests_arrival_s_id ON requests (arrival_s, id);

CREATE INDEX ix_requests_request_class_state ON requests (request_class, state);

CREATE INDEX ix_requests_tenant_arrival_s_id ON requests (tenant, arrival_s, id);

CREATE INDEX ix_requests_unfinished ON requests (arrival_s, id) WHERE NOT (state IN ('finished', 'cancelled', 'failed'));

CREATE TABLE instances (
    id VARCHAR(64) NOT NULL,
    node_id VARCHAR(64) NOT NULL,
    role VARCHAR(16) NOT NULL,
    state VARCHAR(16) NOT NULL,
    tp INTEGER NOT NULL,
    device_indices VARCHAR(256) NOT NULL,
    kv_capacity_tokens BIGINT NOT NULL,
    updated_s DOUBLE PRECISION NOT NULL,
    CONSTRAINT pk_instances PRIMARY KEY (id),
    CONSTRAINT ck_instances_role CHECK (role IN ('general', 'short_decode', 'long_reserved')),
    CONSTRAINT ck_instances_state CHECK (state IN ('up', 'draining', 'down')),
    CONSTRAINT ck_instances_tp CHECK (tp > 0),
    CONSTRAINT fk_instances_node_id_nodes FOREIGN KEY(node_id) REFERENCES nodes (id) ON DELETE CASCADE
);

CREATE INDEX ix_instances_node_id ON instances (node_id);

CREATE TABLE request_events (
    id BIGSERIAL NOT NULL,
    request_id VARCHAR(64) NOT NULL,
    kind VARCHAR(32) NOT NULL,
    at_s DOUBLE PRECISION NOT NULL,
    instance_id VARCHAR(64),
    details JSON NOT NULL,
    CONSTRAINT pk_request_events PRIMARY KEY (id),
    CONSTRAINT fk_request_events_request_id_requests FOREIGN KEY(request_id) REFERENCES requests (id) ON DELETE CASCADE
);

CREATE INDEX ix_request_events_request_id_id ON request_events (request_id, id);

CREATE TABLE request_tokens (
    request_id VARCHAR(64) NOT NULL,
    start_index INTEGER NOT NULL,
    token_ids BYTEA NOT NULL,
    CONSTRAINT pk_request_tokens PRIMARY KEY (request_id, start_index),
    CONSTRAINT fk_request_tokens_request_id_requests FOREIGN KEY(request_id) REFERENCES requests (id) ON DELETE CASCADE
);

INSERT INTO alembic_version (version_num) VALUES ('f474c8b2c22d') RETURNING alembic_version.version_num;

-- Running upgrade f474c8b2c22d -> 5876f467fb1b

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
    to_timestamp(r.arrival_s) AS arrival_at,
    r.first_scheduled_s - r.arrival_s AS queueing_delay_s,
    r.prefill_done_s - r.first_scheduled_s AS prefill_s,
    r.first_token_s - r.arrival_s AS ttft_s,
    r.finished_s - r.arrival_s AS jct_s,
    CASE WHEN r.output_tokens > 1
        THEN (r.finished_s - r.first_token_s) / (r.output_tokens - 1) END AS mean_tbt_s,
    r.num_preemptions AS preemptions,
    r.num_requeues AS requeues,
    r.paused_total_s,
    (SELECT string_agg(DISTINCT e.instance_id, ',' ORDER BY e.instance_id) FROM request_events e WHERE e.request_id = r.id) AS instances,
    r.error
FROM requests r;

CREATE VIEW request_timeline AS
SELECT
    e.request_id,
    e.id AS event_id,
    r.tenant,
    r.request_class,
    e.kind,
    e.at_s,
    to_timestamp(e.at_s) AS at,
    e.at_s - r.arrival_s AS since_arrival_s,
    e.instance_id,
    e.details
FROM request_events e
JOIN requests r ON r.id = e.request_id;

UPDATE alembic_version SET version_num='5876f467fb1b' WHERE alembic_version.version_num = 'f474c8b2c22d';

COMMIT;
