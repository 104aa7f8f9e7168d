"""``fluidity agent``: the local HTTP proxy whose traffic rides the mutual-TLS link."""

from __future__ import annotations

import argparse
from typing import Any

from fluidity.commands.common import add_common_arguments, load_and_log
from fluidity.config import AgentConfig
from fluidity.runtime import run


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run the agent (local proxy on 127.0.0.1:8080)",
        description=(
            "Run the Fluidity agent: an HTTP/1.1 forward proxy (plain HTTP, CONNECT for HTTPS, "
            "WebSocket upgrades) on 127.0.0.1:8080 whose connections are carried as streams over "
            "one mutual-TLS 1.3 link to the server. The server certificate is checked against "
            "server_name (default fluidity-server), not the IP, so --server-ip may change freely. "
            "Reconnects with backoff; SIGINT/SIGTERM stop it gracefully."
        ),
    )
    add_common_arguments(parser, "configs/agent.yaml")
    parser.add_argument("--server-ip", help="server address (overrides server_ip)")
    parser.add_argument("--server-port", type=int, help="server port (overrides server_port)")
    parser.add_argument(
        "--local-proxy-port", type=int, help="local proxy port (overrides local_proxy_port)"
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from fluidity.agent.app import run_agent

    config: AgentConfig = load_and_log(
        AgentConfig,
        args,
        {
            "server_ip": args.server_ip,
            "server_port": args.server_port,
            "local_proxy_port": args.local_proxy_port,
        },
    )
    run(run_agent(config))
    return 0
