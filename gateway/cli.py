"""`pecsched gateway`: the OpenAI-compatible HTTP endpoint in front of a control plane.

Only argparse is imported at module level; Starlette, uvicorn and grpc load in the handler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import GatewaySettings

DEFAULT_LISTEN = "127.0.0.1:8000"


def register(subparsers: Any) -> None:
    """Add `gateway` to the `pecsched` command."""
    p = subparsers.add_parser(
        "gateway",
        help="serve the OpenAI HTTP API (/v1/completions, /v1/chat/completions) for a cluster",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (streamed or "
        "not) in front of the control plane at --target. Callers' bearer tokens are forwarded "
        "as their API keys.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="control plane HOST:PORT")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HTTP HOST:PORT ({DEFAULT_LISTEN})")
    p.add_argument(
        "--model-name",
        default="pecsched",
        help="model id that /v1/models lists and requests must name (default pecsched)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="output limit of requests that set none (default 256)",
    )
    p.add_argument("--log-level", default="info", help="logging level (default info)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from gateway.app import GatewaySettings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = GatewaySettings(
            target=args.target,
            listen=args.listen,
            model_name=args.model_name,
            default_max_tokens=args.default_max_tokens,
        )
    except ValueError as exc:
        print(f"pecsched gateway: error: {exc}", file=sys.stderr)
        return 2
    # uvicorn re-raises the signal that stopped it once it has shut down cleanly: a no-op
    # handler makes that an exit with code 0 rather than death by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    return asyncio.run(serve(settings, args.log_level.lower()))


async def serve(settings: GatewaySettings, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers); returns the exit code."""
    import uvicorn

    from gateway.app import build_app
    from sdk.aio import AsyncClient

    host, port = settings.listen.rsplit(":", 1)
    client = AsyncClient(settings.target)
    config = uvicorn.Config(
        build_app(client, settings),
        host=host,
        port=int(port),
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await client.close()
    return 0
