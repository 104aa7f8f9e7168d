"""The single entry point: ``fluidity <command>``.

Each command lives in :mod:`fluidity.commands` and registers its own sub-parser; this module only
assembles them, sets up logging and turns :class:`~fluidity.errors.FluidityError` into a clean
message and exit status 2 instead of a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from fluidity import __version__
from fluidity.errors import FluidityError

# Modules under fluidity.commands, in the order `fluidity --help` lists them.
COMMAND_MODULES = (
    "up",
    "agent",
    "server",
    "certs",
    "config",
    "control",
    "cloud",
    "doctor",
    "status",
    "service",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="fluidity",
        description=(
            "Fluidity: a local HTTP/HTTPS/WebSocket proxy (the agent) carried over one mutual-TLS "
            "1.3 link to a server you run."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fluidity {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fluidity.commands.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FluidityError as exc:
        print(f"fluidity: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
