"""`python -m dataplane ...`: the data plane's commands (the agent, generate, model export)."""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    """Parse the data plane's subcommands and run the chosen one."""
    import dataplane.cli

    parser = argparse.ArgumentParser(prog="python -m dataplane")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dataplane.cli.register(subparsers)  # adds `agent` too
    args = parser.parse_args()
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
