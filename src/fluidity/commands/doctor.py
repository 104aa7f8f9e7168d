"""``fluidity doctor``: check, in order, everything the agent needs, with a hint for each failure.

1. the config is valid; 2. the certificate files are readable, the key matches, none expired
(a warning under 30 days left); 3. the CA signs them; 4. the server's name resolves and its port
answers over TCP (skipped when the link goes through a proxy); 5. the upstream proxy answers and
which authentication it asks for; 6. the TLS handshake with the server (a certificate our CA did
not sign means something intercepts TLS); 7. a PING over a real link. Exit status 0 only when
every check passed (warnings and skipped checks do not fail).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fluidity.agent.diagnose import FAIL, PASS, SKIP, WARN, Check, Doctor

_MARKS = {PASS: "[ ok ]", WARN: "[warn]", FAIL: "[FAIL]", SKIP: "[skip]"}


def render(results: list[Check]) -> str:
    lines = []
    for check in results:
        lines.append(f"{_MARKS[check.status]} {check.name}: {check.detail}")
        if check.hint and check.status in (FAIL, WARN):
            lines.append(f"       hint: {check.hint}")
    failed = sum(1 for c in results if c.status == FAIL)
    lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check config, certificates, network, proxy, TLS and the link, with hints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", type=Path, default=None, help="agent config file")
    parser.add_argument("--server-ip", help="server address (overrides server_ip)")
    parser.add_argument("--server-port", type=int, help="server port (overrides server_port)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds allowed to each network check (default: %(default)s)",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from fluidity.runtime import run

    doctor = Doctor(
        args.config,
        {"server_ip": args.server_ip, "server_port": args.server_port},
        timeout=args.timeout,
    )
    results = run(doctor.run())
    print(render(results))
    return 0 if all(c.status != FAIL for c in results) else 1


__all__ = ["FAIL", "PASS", "SKIP", "WARN", "Check", "Doctor", "render"]
