"""Composition root of the control plane: `python -m controlplane [flags]`.

Builds the one frozen Config, the database engine (refusing a stale schema with the command
that fixes it), the repository, the policy, telemetry, the runtime and the servers; the port
opens first (health NOT_SERVING, calls wait) while the runtime recovers unfinished requests,
then it serves until SIGTERM/SIGINT. `pecsched controlplane` runs
`main()` with the same flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.config import Config, load_config

if TYPE_CHECKING:  # the modules load when serving, not for `--help`
    import grpc
    from sqlalchemy import Engine

    from controlplane.core.policy import Policy
    from controlplane.text.codec import TextCodec

_log = logging.getLogger("controlplane")


def _help(name: str) -> str:
    """The Config field's help text with its default (field metadata doubles as CLI help)."""
    field = next(f for f in dataclasses.fields(Config) if f.name == name)
    default = getattr(Config(), name)
    return f"{field.metadata['help']} (default {default})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `pecsched controlplane` (None = keep the file/env/default value)."""
    parser.add_argument("--db", dest="db_url", metavar="URL", help=_help("db_url"))
    parser.add_argument("--listen", metavar="ADDR", help=_help("listen"))
    parser.add_argument("--policy", metavar="NAME", help=_help("policy"))
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    parser.add_argument("--metrics-port", type=int, metavar="P", help=_help("metrics_port"))
    parser.add_argument("--otlp-endpoint", metavar="URL", help=_help("otlp_endpoint"))
    parser.add_argument("--tokenizer", metavar="DIR", help=_help("tokenizer"))
    parser.add_argument(
        "--no-auth",
        dest="auth_enabled",
        action="store_const",
        const=False,
        help="accept calls without API keys (local development only)",
    )
    parser.add_argument(
        "--heartbeat-interval-s", type=float, metavar="S", help=_help("heartbeat_interval_s")
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config for parsed flags, the config file and the process environment."""
    overrides = {
        name: getattr(args, name, None)
        for name in (
            "db_url",
            "listen",
            "policy",
            "metrics_port",
            "otlp_endpoint",
            "tokenizer",
            "auth_enabled",
            "heartbeat_interval_s",
        )
    }
    return load_config(file=args.config, env=os.environ, overrides=overrides)


def run(args: argparse.Namespace) -> int:
    """Serve until a signal; returns the process exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


@dataclasses.dataclass(frozen=True, slots=True)
class _Parts:
    """What `serve` builds from the Config before anything listens."""

    policy: Policy
    text_codec: TextCodec | None
    engine: Engine
    tls: grpc.ServerCredentials | None


def _prepare(config: Config) -> _Parts | int:
    """The parts, or the exit code after printing why not: 2 for a bad setting or file, 3 for
    a stale schema, 1 for an unreachable database."""
    from controlplane.api.server import tls_credentials
    from controlplane.core.policies.registry import make_policy
    from controlplane.store import migrate
    from controlplane.store.engine import make_engine
    from controlplane.store.errors import SchemaOutdated, StoreError
    from controlplane.text.codec import load_text_codec

    try:
        policy = make_policy(config.policy, config.scheduler, config.seed)
        text_codec = load_text_codec(config)
        engine = make_engine(config.db_url)
        tls = tls_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    except (KeyError, ValueError, OSError) as exc:
        detail = exc if isinstance(exc, OSError) or not exc.args else exc.args[0]
        print(f"error: {detail}", file=sys.stderr)
        return 2
    try:
        migrate.verify_schema(engine)
    except SchemaOutdated as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 3
    except StoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return _Parts(policy, text_codec, engine, tls)


async def serve(config: Config) -> int:
    """Build everything from `config` and serve until SIGTERM/SIGINT or a fatal error."""
    from controlplane.api.auth import Authenticator
    from controlplane.api.metrics_http import MetricsHttpServer
    from controlplane.api.server import ApiServer
    from controlplane.runtime.clock import SystemClock
    from controlplane.runtime.loop import Runtime
    from controlplane.store.sql_repository import SqlRepository
    from controlplane.telemetry import Telemetry

    parts = _prepare(config)
    if isinstance(parts, int):
        return parts
    repo = SqlRepository(parts.engine)
    telemetry = Telemetry.otlp(config.otlp_endpoint) if config.otlp_endpoint else Telemetry.noop()
    runtime = Runtime(config, parts.policy, repo, telemetry, SystemClock())
    authenticator = Authenticator(repo if config.auth_enabled else None, None)
    api = ApiServer(runtime, authenticator, config.listen, parts.text_codec, parts.tls)
    # Start-up and load build objects by the hundred thousand: collect less often, and keep
    # what lives until exit (modules, then the recovered state) out of every later collection.
    gc.set_threshold(20_000, 10, 10)
    gc.freeze()
    port = await api.start()  # health NOT_SERVING until recovery ends; calls wait for it
    recovered = await runtime.start()
    gc.freeze()
    metrics = None
    if config.metrics_port is not None:
        metrics = MetricsHttpServer(
            runtime.metrics.render, config.metrics_host, config.metrics_port
        )
        metrics_port = await metrics.start()
        _log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics_port)
    host = config.listen.rsplit(":", 1)[0]
    _log.info(
        "listening on %s:%d policy=%s recovered=%d auth=%s tokenizer=%s",
        host,
        port,
        config.policy,
        recovered,
        "on" if config.auth_enabled else "OFF",
        parts.text_codec.name if parts.text_codec is not None else "none (token ids only)",
    )
    print(f"pecsched controlplane listening on {host}:{port}", flush=True)
    await _until_signal()
    await api.stop()
    if metrics is not None:
        await metrics.stop()
    await runtime.stop()
    telemetry.shutdown()
    parts.engine.dispose()
    return 0


async def _until_signal() -> None:
    """Return at the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m controlplane`: parse flags and serve."""
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
