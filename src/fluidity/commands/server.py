"""``fluidity server``: accept agents over mutual TLS 1.3 and dial their targets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fluidity.commands.common import add_common_arguments, load_and_log
from fluidity.config import ServerConfig, load_config
from fluidity.errors import FluidityError
from fluidity.runtime import run


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "server",
        help="run the server (accepts agents on port 8443)",
        description=(
            "Run the Fluidity server: listen for agents over mutual TLS 1.3 (client certificate "
            "required), dial each stream's target under the egress policy, pipe the bytes. "
            "SIGINT/SIGTERM: stop accepting, send GOAWAY, let streams finish for "
            "shutdown_grace, exit 0."
        ),
    )
    add_common_arguments(parser, "configs/server.yaml")
    parser.add_argument("--listen-addr", help="address to listen on (listen_addr, 0.0.0.0)")
    parser.add_argument("--listen-port", type=int, help="port to listen on (listen_port, 8443)")
    parser.set_defaults(handler=main)
    subcommands = parser.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    check = subcommands.add_parser(
        "healthcheck",
        help="exit 0 if the server on this machine is healthy (the container health check)",
        description=(
            "Ask the running server's health endpoint on 127.0.0.1:health_port (same config file "
            "and FLUIDITY_* environment as the server). Exit 0 while it accepts agents; 1 if it "
            "is draining, not accepting, not answering within --timeout or not running."
        ),
    )
    # SUPPRESS: `fluidity server --config X healthcheck` keeps X instead of a None default.
    check.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS,
                       help="the server's YAML config file")  # fmt: skip
    check.add_argument("--timeout", type=float, default=3.0,
                       help="seconds to wait for the answer (default 3)")  # fmt: skip
    check.set_defaults(handler=healthcheck)


def main(args: argparse.Namespace) -> int:
    from fluidity.server.app import serve

    config: ServerConfig = load_and_log(
        ServerConfig,
        args,
        {"listen_addr": args.listen_addr, "listen_port": args.listen_port},
    )
    run(serve(config))
    return 0


def healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 if healthy, 1 otherwise (Docker reserves 2), with one line saying why."""
    from fluidity.server.health import check_health

    try:
        config = load_config(ServerConfig, args.config)
    except FluidityError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if not config.health_port:
        print("unhealthy: the health endpoint is off: set health_port (FLUIDITY_HEALTH_PORT)",
              file=sys.stderr)  # fmt: skip
        return 1
    result = check_health(config.health_port, args.timeout)
    print(("healthy: " if result.healthy else "unhealthy: ") + result.detail,
          file=sys.stdout if result.healthy else sys.stderr)  # fmt: skip
    return 0 if result.healthy else 1
