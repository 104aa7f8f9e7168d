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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with every command registered (or just the one named ``only``).

    Registering one command imports only its module: ``fluidity agent`` and ``fluidity server``
    then never import what ``certs``, ``doctor`` or ``cloud`` need (cryptography alone costs
    about 10 MiB of RSS in each long-running process).
    """
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
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"fluidity.commands.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    # The first argument names the command unless it is an option (--help, --version); anything
    # else (a typo, no command) gets the full parser and so the full list of commands.
    first = arguments[0] if arguments else ""
    parser = build_parser(first if first in COMMAND_MODULES else None)
    args = parser.parse_args(arguments)
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
