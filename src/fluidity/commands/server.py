"""``fluidity server``: accept agents over mutual TLS 1.3 and dial their targets."""

from __future__ import annotations

import argparse
from typing import Any

from fluidity.commands.common import add_common_arguments, load_and_log
from fluidity.config import ServerConfig
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


def main(args: argparse.Namespace) -> int:
    from fluidity.server.app import serve

    config: ServerConfig = load_and_log(
        ServerConfig,
        args,
        {"listen_addr": args.listen_addr, "listen_port": args.listen_port},
    )
    run(serve(config))
    return 0
