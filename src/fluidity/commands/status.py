"""``fluidity status``: what a running agent reports at ``/status``, as a table.

Exit status: 0 when the agent's link is connected, 1 when the agent answers but has no link
(reconnecting, waking), 2 when no agent answers (with a message saying where it looked).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fluidity.config import AgentConfig, load_config
from fluidity.errors import FluidityError


def status_url(config: AgentConfig) -> str:
    """Where the agent of ``config`` answers ``/status`` (wildcard binds are asked on loopback)."""
    host = config.local_proxy_addr
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    authority = f"[{host}]" if ":" in host else host
    return f"http://{authority}:{config.local_proxy_port}/status"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url`` directly (never through a proxy from the environment) and parse the JSON."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            data = response.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        raise FluidityError(
            f"the agent at {url} answered {exc.code} {exc.reason}"
            + (
                " (status.allow_remote is off: ask from the agent's machine)"
                if exc.code == 403
                else ""
            )
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FluidityError(
            f"no agent answers at {url} ({reason}): is `fluidity agent` running? "
            "(pass --config or --url to look elsewhere)"
        ) from None
    try:
        result: dict[str, Any] = json.loads(data)
    except ValueError:
        raise FluidityError(f"{url} did not answer with the agent's JSON status") from None
    return result


def status_table(status: dict[str, Any]) -> Table:
    link, clients = status["link"], status["clients"]
    table = Table(title=f"Fluidity agent {status.get('version', '')}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    rtt = link.get("rtt_ms")
    rows = [
        ("link", link["state"]),
        ("server", f"{link['server']} (name {link['server_name']})"),
        ("route", link.get("via", "direct")),
        ("round trip", f"{rtt} ms" if rtt is not None else "-"),
        ("last link error", link.get("last_error") or "-"),
        ("lifecycle", status.get("lifecycle") or "-"),
        ("up since", f"{status['started_at']} ({status['uptime_seconds']:.0f} s)"),
        ("open streams", str(status["streams_open"])),
        ("bytes sent / received", f"{status['bytes']['sent']} / {status['bytes']['received']}"),
        ("client connections", str(clients["active_connections"])),
        ("open failures", str(clients["open_failures"])),
        ("proxy", ", ".join(status["listening"]["proxy"])),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for error in status.get("recent_errors", [])[-5:]:
        table.add_row("recent error", f"{error['time']} {error['message']}")
    return table


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show what a running agent reports (link, server, streams, errors)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", "-c", type=Path, default=None, help="agent config file (to find its port)"
    )
    parser.add_argument("--url", help="status URL (default: from the config, port 8080)")
    parser.add_argument("--json", action="store_true", help="print the JSON as it came")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    url = args.url or status_url(load_config(AgentConfig, args.config))
    status = fetch_status(url)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        Console().print(status_table(status))
    return 0 if status["link"]["state"] == "connected" else 1
