"""``fluidity control``: the control plane (``serve``) and its client calls (wake, status, ...).

``fluidity control serve --backend local`` runs the lifecycle API and schedule around a local
``fluidity server`` process; ``--backend ecs`` around an ECS service (what the Lambdas do on AWS).
``fluidity control wake|status|sleep|kill`` call such an API (local, or API Gateway) and print its
JSON answer. :func:`up_with_lifecycle` is ``fluidity up --lifecycle``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from fluidity.commands.common import add_common_arguments, load_and_log
from fluidity.config import ControlConfig
from fluidity.errors import FluidityError
from fluidity.runtime import run

KEY_VARIABLE = "FLUIDITY_CONTROL_KEY"
"""Environment variable the client calls (and the generated local config) take the key from."""
_METHODS = {"wake": "POST", "status": "GET", "sleep": "POST", "kill": "POST"}

CONTROL_LOCAL = """\
# Written by `fluidity up --lifecycle` because {wanted} was not found.
backend: local
listen_addr: "127.0.0.1"
listen_port: {control_port}
api_key: "${{{key_variable}}}"
idle_threshold: "15m"
startup_grace: "1m"
release_window: "2m"
sleep_check_interval: "1m"
daily_kill_time: "23:00"
local:
  server_config: "{server_config}"
"""


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "control",
        help="the control plane: wake, sleep, kill, status (serve it, or call it)",
        description=(
            "Run the lifecycle control plane (`serve`) or call one (`wake`, `status`, `sleep`, "
            "`kill`). The API and its JSON answers are those of the AWS Lambdas: see "
            "docs/lambda.md."
        ),
    )
    commands = parser.add_subparsers(dest="control_command", metavar="SUBCOMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the control API and schedule (local process or ECS service)",
        description=(
            "Serve POST /wake, /sleep, /kill and GET /status (x-api-key required) on "
            "listen_addr:listen_port, check idleness every sleep_check_interval and kill daily "
            "at daily_kill_time (UTC). --backend local starts and stops a `fluidity server` "
            "process on this machine; --backend ecs sets an ECS service's desired count."
        ),
    )
    add_common_arguments(serve, "configs/control.local.yaml")
    serve.add_argument("--backend", choices=["local", "ecs"], help="where the server runs")
    serve.add_argument("--listen-port", type=int, help="port of the control API (listen_port)")
    serve.add_argument(
        "--server-config", type=Path, help="config of the local server (local.server_config)"
    )
    serve.set_defaults(handler=serve_main)
    for name, help_text in (
        ("wake", "start the server if it is stopped; print state and public IP"),
        ("status", "print state, desired/running counts and public IP"),
        ("sleep", "run the idle check now: stop the server if idle"),
        ("kill", "stop the server now (or, with --release, unless another agent is active)"),
    ):
        call = commands.add_parser(name, help=help_text, description=help_text + ".")
        call.add_argument(
            "--url",
            default=os.environ.get("FLUIDITY_CONTROL_URL", "http://127.0.0.1:8090"),
            help="base URL of the control API (FLUIDITY_CONTROL_URL; an API Gateway stage URL "
            "works too)",
        )
        call.add_argument(
            "--timeout", type=float, default=30.0, help="seconds to wait for the answer"
        )
        if name == "kill":
            call.add_argument(
                "--release", action="store_true", help="stop only if no other agent is active"
            )
            call.add_argument("--agent-id", help="the releasing agent (certificate CN)")
        call.set_defaults(handler=call_main, operation=name)


def serve_main(args: argparse.Namespace) -> int:
    from fluidity.control.api import serve_control

    config: ControlConfig = load_and_log(
        ControlConfig,
        args,
        {
            "backend": args.backend,
            "listen_port": args.listen_port,
            "local.server_config": args.server_config,
        },
    )
    run(serve_control(config))
    return 0


def call_main(args: argparse.Namespace) -> int:
    """One call; the JSON answer on stdout; exit 0 on 2xx, 1 otherwise."""
    operation: str = args.operation
    key = os.environ.get(KEY_VARIABLE)
    if not key:
        raise FluidityError(f"set {KEY_VARIABLE} to the control API's key (sent as x-api-key)")
    body: bytes | None = None
    if operation == "kill":
        payload: dict[str, Any] = {"mode": "release" if args.release else "kill"}
        if args.agent_id:
            payload["agent_id"] = args.agent_id
        body = json.dumps(payload).encode()
    elif _METHODS[operation] == "POST":
        body = b""
    url = f"{args.url.rstrip('/')}/{operation}"
    request = urllib.request.Request(url, data=body, method=_METHODS[operation])
    request.add_header("x-api-key", key)
    request.add_header("content-type", "application/json")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(request, timeout=args.timeout) as response:
            print(response.read().decode("utf-8", "replace"))
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace"))
        print(f"fluidity: control API answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FluidityError(f"cannot reach the control API at {url}: {reason}") from None


def up_with_lifecycle(args: argparse.Namespace) -> int:
    """``fluidity up --lifecycle``: control plane (local backend) + agent; the server on demand.

    The control plane starts the server when the agent wakes it, puts it to sleep when idle and
    stops it when the agent exits (a release). A fresh random key joins the two.
    """
    from fluidity.commands import up

    up._ensure_certs(args.certs)
    server_config = up._config(args.server_config, up.SERVER_LOCAL, args)
    agent_config = up._config(args.agent_config, up.AGENT_LOCAL, args)
    control_config = _control_config(args, server_config)
    proxy_port = up._port_of(agent_config, "local_proxy_port", args.proxy_port)
    from fluidity.config import load_config

    key = secrets.token_urlsafe(24)
    env = {**os.environ, KEY_VARIABLE: key}
    control = load_config(ControlConfig, control_config, environ=env)
    base = f"http://127.0.0.1:{control.listen_port}"
    agent_env = {
        **os.environ,
        "FLUIDITY_LIFECYCLE__ENABLED": "true",
        "FLUIDITY_LIFECYCLE__WAKE_API_ENDPOINT": f"{base}/wake",
        "FLUIDITY_LIFECYCLE__KILL_API_ENDPOINT": f"{base}/kill",
        "FLUIDITY_LIFECYCLE__STATUS_API_ENDPOINT": f"{base}/status",
        "FLUIDITY_LIFECYCLE__API_KEY": key,
    }
    command = [sys.executable, "-m", "fluidity"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        children.append(
            subprocess.Popen(
                [*command, "control", "serve", "--config", str(control_config)],
                env=env,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + args.ready_timeout
        up._wait_listening(control.listen_port, deadline, children)
        children.append(
            subprocess.Popen(
                [*command, "agent", "--config", str(agent_config)],
                env=agent_env,
                start_new_session=True,
            )
        )
        up._wait_listening(proxy_port, deadline, children)
        print(
            f"\nFluidity is up with its lifecycle: proxy http://127.0.0.1:{proxy_port}, control "
            f"API {base} (key in {KEY_VARIABLE} of this session only).\n"
            "The server starts on demand, sleeps after idle_threshold without traffic and stops "
            f"when the agent exits ({control_config}).\n"
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
        # The agent first (it releases the server), then the control plane (it stops the
        # server if it still runs).
        for child in reversed(children):
            up._stop([child], grace=control.local.stop_timeout + 5)
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


def _control_config(args: argparse.Namespace, server_config: Path) -> Path:
    wanted: Path = args.control_config
    if wanted.exists():
        return wanted
    generated = Path(".fluidity") / wanted.name
    generated.parent.mkdir(exist_ok=True)
    generated.write_text(
        CONTROL_LOCAL.format(
            wanted=wanted,
            control_port=args.control_port,
            key_variable=KEY_VARIABLE,
            server_config=server_config.resolve(),
        )
    )
    return generated
