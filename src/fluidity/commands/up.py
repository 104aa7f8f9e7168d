"""``fluidity up``: the whole tunnel on one machine (certificates, server, agent) until Ctrl-C.

Server and agent run as two child processes, as they would on two machines, so each gets its own
event loop and CPU core. Ctrl-C or SIGTERM stops both gracefully (SIGTERM, then SIGKILL after
their shutdown grace).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fluidity.errors import FluidityError

SERVER_LOCAL = """\
# Written by `fluidity up` because configs/server.local.yaml was not found.
listen_addr: "127.0.0.1"
listen_port: {server_port}
cert_file: "{certs}/server.crt"
key_file: "{certs}/server.key"
ca_cert_file: "{certs}/ca.crt"
egress:
  allow_cidrs: ["127.0.0.0/8", "::1/128"]
"""

AGENT_LOCAL = """\
# Written by `fluidity up` because configs/agent.local.yaml was not found.
server_ip: "127.0.0.1"
server_port: {server_port}
local_proxy_port: {proxy_port}
cert_file: "{certs}/client.crt"
key_file: "{certs}/client.key"
ca_cert_file: "{certs}/ca.crt"
"""


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run server and agent on this machine (what `make run` does)",
        description=(
            "Run the whole tunnel on loopback: create certificates in --certs if missing, start "
            "`fluidity server` and `fluidity agent` with the local configs, print the proxy "
            "address and a curl line, and stop both cleanly on Ctrl-C."
        ),
    )
    parser.add_argument("--certs", type=Path, default=Path("certs"), help="certificate directory")
    parser.add_argument(
        "--server-config",
        type=Path,
        default=Path("configs/server.local.yaml"),
        help="server config (written to .fluidity/ with loopback defaults if missing)",
    )
    parser.add_argument(
        "--agent-config",
        type=Path,
        default=Path("configs/agent.local.yaml"),
        help="agent config (written to .fluidity/ with loopback defaults if missing)",
    )
    parser.add_argument("--server-port", type=int, default=8443, help="port for generated config")
    parser.add_argument("--proxy-port", type=int, default=8080, help="port for generated config")
    parser.add_argument(
        "--ready-timeout", type=float, default=15.0, help="seconds to wait for both to listen"
    )
    parser.add_argument(
        "--lifecycle",
        action="store_true",
        help="run the control plane instead of the server: the agent wakes the server on demand, "
        "it sleeps when idle and stops when the agent exits",
    )
    parser.add_argument(
        "--control-config",
        type=Path,
        default=Path("configs/control.local.yaml"),
        help="control-plane config with --lifecycle (written to .fluidity/ if missing)",
    )
    parser.add_argument("--control-port", type=int, default=8090, help="port for generated config")
    parser.set_defaults(handler=main)


def _ensure_certs(directory: Path) -> None:
    from fluidity.certs import init_pki

    if (directory / "ca.crt").exists():
        return
    init_pki(directory)
    print(f"fluidity up: created a CA, server and client certificate in {directory}/")


def _config(path: Path, template: str, args: argparse.Namespace) -> Path:
    if path.exists():
        return path
    generated = Path(".fluidity") / path.name
    generated.parent.mkdir(exist_ok=True)
    generated.write_text(
        template.format(
            server_port=args.server_port, proxy_port=args.proxy_port, certs=args.certs.resolve()
        )
    )
    return generated


def _port_of(config: Path, key: str, default: int) -> int:
    from fluidity.config import AgentConfig, ServerConfig, load_config

    model = ServerConfig if key == "listen_port" else AgentConfig
    loaded = load_config(model, config)
    return int(getattr(loaded, key, default))


def _wait_listening(port: int, deadline: float, children: list[subprocess.Popen[bytes]]) -> None:
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise FluidityError(
                    f"a child process exited with status {child.returncode} during start-up; "
                    "its log above says why"
                )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FluidityError(f"nothing listens on 127.0.0.1:{port} after the ready timeout")


def _stop(children: list[subprocess.Popen[bytes]], grace: float = 12.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(args: argparse.Namespace) -> int:
    if args.lifecycle:
        from fluidity.commands.control import up_with_lifecycle

        return up_with_lifecycle(args)
    _ensure_certs(args.certs)
    server_config = _config(args.server_config, SERVER_LOCAL, args)
    agent_config = _config(args.agent_config, AGENT_LOCAL, args)
    server_port = _port_of(server_config, "listen_port", args.server_port)
    proxy_port = _port_of(agent_config, "local_proxy_port", args.proxy_port)
    command = [sys.executable, "-m", "fluidity"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # Children ignore the terminal's Ctrl-C; this process stops them in order.
        children.append(
            subprocess.Popen(
                [*command, "server", "--config", str(server_config)],
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + args.ready_timeout
        _wait_listening(server_port, deadline, children)
        children.append(
            subprocess.Popen(
                [*command, "agent", "--config", str(agent_config)],
                start_new_session=True,
            )
        )
        _wait_listening(proxy_port, deadline, children)
        print(
            f"\nFluidity is up: proxy http://127.0.0.1:{proxy_port} -> server 127.0.0.1:"
            f"{server_port} (mutual TLS 1.3).\n"
            "Try it (any local web server will do; loopback targets are allowed locally):\n"
            "  python3 -m http.server 8000 --bind 127.0.0.1 &\n"
            f"  curl -x http://127.0.0.1:{proxy_port} http://127.0.0.1:8000/\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    print(f"fluidity up: a child exited with status {child.returncode}; stopping")
                    stopping = True
            time.sleep(0.2)
    finally:
        _stop(children)
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0
