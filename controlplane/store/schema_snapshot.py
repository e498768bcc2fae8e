"""The committed schema snapshot `docs/schema.sql`: the PostgreSQL DDL of every migration.

Regenerate after adding a migration (tests/migrations checks it):
    .venv/bin/python -m controlplane.store.schema_snapshot > docs/schema.sql
"""

from __future__ import annotations

import sys

from controlplane.store import migrate

HEADER = (
    "-- PecSched control-plane schema on PostgreSQL: the SQL `pecsched db upgrade` runs on an\n"
    "-- empty database (generated from migrations/; do not edit).\n"
    "-- Regenerate: .venv/bin/python -m controlplane.store.schema_snapshot > docs/schema.sql\n\n"
)


def render_schema_snapshot() -> str:
    """The text docs/schema.sql must contain."""
    lines = migrate.offline_sql("postgresql+psycopg://").splitlines()
    return HEADER + "\n".join(line.rstrip() for line in lines).strip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_schema_snapshot())
