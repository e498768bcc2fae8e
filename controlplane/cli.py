"""`pecsched` subcommands of the control plane: `controlplane`, `db upgrade|current`, `keys create`.

`register(subparsers)` adds one top-level command per entry of `_COMMANDS`; each adds its own
sub-subcommands and sets `handler`. Only argparse is imported at module level: SQLAlchemy and
Alembic load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

DEFAULT_DB_URL = "sqlite:///pecsched.db"  # == controlplane.store.engine.DEFAULT_DB_URL


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the control plane's commands to the `pecsched` parser."""
    for add_command in _COMMANDS:
        add_command(subparsers)


def _add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=DEFAULT_DB_URL,
        metavar="URL",
        help=f"database URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB "
        f"(default {DEFAULT_DB_URL})",
    )


def _add_db_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="database schema: upgrade to the head, show revision")
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = actions.add_parser("upgrade", help="migrate the database to the latest schema")
    _add_db_argument(upgrade)
    upgrade.set_defaults(handler=_db_upgrade)
    current = actions.add_parser("current", help="print the schema revision and whether current")
    _add_db_argument(current)
    current.set_defaults(handler=_db_current)


def _add_keys_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="API keys for clients and admins")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create an API key and print it (shown once)")
    create.add_argument("--role", required=True, choices=("client", "admin"))
    create.add_argument("--tenant", required=True, help="tenant the key's requests belong to")
    _add_db_argument(create)
    create.set_defaults(handler=_keys_create)
    revoke = actions.add_parser(
        "revoke", help="revoke an API key (servers refuse it within their 30 s key cache)"
    )
    revoke.add_argument("key_id", help="the key id printed by `keys create` (pecsched_<id>_...)")
    _add_db_argument(revoke)
    revoke.set_defaults(handler=_keys_revoke)


def _add_controlplane_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    from controlplane.__main__ import add_arguments

    server = subparsers.add_parser(
        "controlplane",
        help="run the control plane (gRPC API, scheduler, agent streams)",
        description="Serve the PecSched control plane until SIGTERM. Settings come from "
        "defaults < --config FILE < PECSCHED_* environment variables < flags "
        "(docs/deploying.md lists them).",
    )
    add_arguments(server)
    server.set_defaults(handler=_controlplane)


def _controlplane(args: argparse.Namespace) -> int:
    from controlplane.__main__ import run

    return run(args)


_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_controlplane_command,
    _add_db_command,
    _add_keys_command,
)


def _db_upgrade(args: argparse.Namespace) -> int:
    from controlplane.store import migrate
    from controlplane.store.engine import make_engine
    from controlplane.store.errors import StoreError

    engine = make_engine(args.db)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    except StoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if before == after:
        print(f"already at head {after}")
    else:
        print(f"upgraded {before or '<empty>'} -> {after}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from controlplane.store import migrate
    from controlplane.store.engine import make_engine
    from controlplane.store.errors import StoreError

    engine = make_engine(args.db)
    try:
        current = migrate.current_revision(engine)
        head = migrate.head_revision()
    except StoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if current == head:
        print(f"{current} (head)")
        return 0
    print(f"{current or '<empty>'} (head is {head}; run `{migrate.upgrade_command(engine)}`)")
    return 1


def _keys_create(args: argparse.Namespace) -> int:
    from controlplane.store import migrate
    from controlplane.store.engine import make_engine
    from controlplane.store.errors import StoreError
    from controlplane.store.records import ApiKeyRole
    from controlplane.store.sql_repository import SqlRepository

    engine = make_engine(args.db)
    try:
        migrate.verify_schema(engine)
        record, key = SqlRepository(engine).create_api_key(
            ApiKeyRole(args.role), args.tenant, time.time()
        )
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(
        f"key id {record.key_id}, role {record.role.value}, tenant {record.tenant}", file=sys.stderr
    )
    print("store this key now; it cannot be shown again:", file=sys.stderr)
    print(key)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from controlplane.store import migrate
    from controlplane.store.engine import make_engine
    from controlplane.store.errors import StoreError
    from controlplane.store.sql_repository import SqlRepository

    engine = make_engine(args.db)
    try:
        migrate.verify_schema(engine)
        SqlRepository(engine).revoke_api_key(args.key_id, time.time())
    except StoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"revoked key {args.key_id}")
    return 0
