"""`pecsched`: one command whose subcommands come from each component's `cli` module.

Each component module exposes `register(subparsers)`, which adds its subcommands and sets
`handler` (a callable taking the parsed namespace and returning an exit code) as the parser
default. Component `cli` modules import only argparse at import time and load heavy
dependencies (torch, grpc, sqlalchemy) inside their handlers, so `pecsched --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import controlplane.cli
import dataplane.cli
import gateway.cli
import pecsched.replay
import pecsched.up
import sdk.cli
import sim.cli

# Components that contribute subcommands, in the order `pecsched --help` lists them.
COMPONENT_CLIS: tuple[ModuleType, ...] = (
    sdk.cli,
    dataplane.cli,
    controlplane.cli,
    sim.cli,
    gateway.cli,
    pecsched.replay,
    pecsched.up,
)


def _version() -> str:
    try:
        return version("pecsched")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The full `pecsched` argument parser with every component's subcommands."""
    parser = argparse.ArgumentParser(
        prog="pecsched",
        description="PecSched: a cluster scheduler for LLM inference with mixed prompt lengths.",
    )
    parser.add_argument("--version", action="version", version=f"pecsched {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for component in COMPONENT_CLIS:
        component.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
