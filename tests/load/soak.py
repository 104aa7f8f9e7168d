"""Soak: mixed traffic through real agent and server processes, with RSS and open descriptors
sampled at a fixed interval, and the trend after warm-up reported as a least-squares slope.

``make soak`` runs ``python -m tests.load.soak`` (10 minutes, a sample every 10 s, the first
2 minutes as warm-up). Traffic, all through the agent's proxy to origins on 127.0.0.1:

- bulk: 8 MiB downloads, two at a time, checked by SHA-256;
- small: 1000-byte GETs from eight workers;
- WebSockets: secure-less WebSocket sessions over CONNECT, 20 echoed messages each;
- tunnels: CONNECT tunnels to an echo server opened, used and closed by four workers.

Every failed operation is counted. The report (Markdown on stdout, JSON in
``test-artifacts/soak.json``) lists the samples, operations, errors and, for each process, the
slope of RSS (KiB/min) and descriptors (per minute) after warm-up. A leak shows as a steady
positive slope; noise around zero is none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from fluidity.certs import init_pki
from tests.faults.support import (
    FLUIDITY,
    Proc,
    fetch,
    free_port,
    open_fds,
    rss_kib,
    wait_port,
    write_agent_config,
    write_server_config,
)
from tests.integration.origins import HttpOrigin, WebSocketEchoOrigin, pattern_sha256
from tests.integration.stack import echo_handler, tcp_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
MiB = 1024 * 1024


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


class Soak:
    def __init__(
        self, proxy_port: int, http: HttpOrigin, ws: WebSocketEchoOrigin, echo: int
    ) -> None:
        self.proxy_port = proxy_port
        self.http = http
        self.ws = ws
        self.echo_port = echo
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}
        self.stopping = False

    def _fail(self, kind: str, why: str) -> None:
        self.errors[kind] += 1
        self.last_error[kind] = why[:200]

    async def bulk(self) -> None:
        while not self.stopping:
            result = await fetch(self.proxy_port, self.http.url(f"/bytes/{8 * MiB}"), timeout=60)
            if result.ok and result.sha256 == pattern_sha256(8 * MiB):
                self.ops["bulk"] += 1
            else:
                self._fail("bulk", result.error or f"status {result.status}")

    async def small(self) -> None:
        while not self.stopping:
            result = await fetch(self.proxy_port, self.http.url("/bytes/1000"), timeout=30)
            if result.ok and result.sha256 == pattern_sha256(1000):
                self.ops["small"] += 1
            else:
                self._fail("small", result.error or f"status {result.status}")

    async def _tunnel_socket(self, port: int) -> socket.socket:
        """A socket already through the proxy (CONNECT answered 200), for the WebSocket client."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.proxy_port))
            await loop.sock_sendall(
                sock, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:  # nothing follows the answer until we speak
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ConnectionError("proxy closed the CONNECT")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode())
        except BaseException:
            sock.close()
            raise
        return sock

    async def websockets(self) -> None:
        while not self.stopping:
            try:
                async with asyncio.timeout(30):
                    sock = await self._tunnel_socket(self.ws.port)
                    async with ws_connect(self.ws.uri(), sock=sock, compression=None) as ws:
                        for index in range(20):
                            message = f"message {index} " + "x" * random.randint(0, 2000)
                            await ws.send(message)
                            if await ws.recv() != message:
                                raise AssertionError("echo mismatch")
                self.ops["websocket"] += 1
            except (OSError, AssertionError, TimeoutError, WebSocketException) as exc:
                self._fail("websocket", f"{type(exc).__name__}: {exc}")

    async def tunnels(self) -> None:
        while not self.stopping:
            try:
                async with asyncio.timeout(30):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
                    writer.write(
                        f"CONNECT 127.0.0.1:{self.echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise ConnectionError(head[:40].decode())
                    payload = random.randbytes(random.randint(1, 64 * 1024))
                    writer.write(payload)
                    echoed = await reader.readexactly(len(payload))
                    writer.close()
                    if echoed != payload:
                        raise AssertionError("echo mismatch")
                self.ops["tunnel"] += 1
            except (OSError, AssertionError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._fail("tunnel", f"{type(exc).__name__}: {exc}")


async def run(seconds: float, interval: float, warmup: float, workdir: Path) -> dict[str, Any]:
    pki = init_pki(workdir / "certs")
    server_port, proxy_port = free_port(), free_port()
    server_config = write_server_config(workdir / "server.yaml", pki, server_port)
    agent_config = write_agent_config(workdir / "agent.yaml", pki, server_port, proxy_port)
    server = Proc(workdir, "server", [*FLUIDITY, "server", "--config", str(server_config)])
    agent = Proc(workdir, "agent", [*FLUIDITY, "agent", "--config", str(agent_config)])
    procs = {"agent": agent, "server": server}
    samples: list[dict[str, Any]] = []
    try:
        server.start()
        await wait_port(server_port, server)
        agent.start()
        await wait_port(proxy_port, agent)
        async with (
            HttpOrigin() as http,
            WebSocketEchoOrigin() as ws,
            tcp_server(echo_handler) as echo,
        ):
            soak = Soak(proxy_port, http, ws, echo)
            workers = [
                soak.bulk,
                soak.bulk,
                *[soak.small] * 8,
                *[soak.websockets] * 2,
                *[soak.tunnels] * 4,
            ]
            tasks = [asyncio.create_task(worker()) for worker in workers]
            started = time.monotonic()
            while True:
                elapsed = time.monotonic() - started
                sample: dict[str, Any] = {
                    "t": round(elapsed, 1),
                    "ops": dict(soak.ops),
                    "errors": dict(soak.errors),
                }
                for name, proc in procs.items():
                    sample[f"{name}_rss_kib"] = rss_kib(proc.pid)
                    sample[f"{name}_fds"] = open_fds(proc.pid)
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                if elapsed >= seconds:
                    break
                await asyncio.sleep(min(interval, max(0.0, seconds - elapsed)) or interval)
            soak.stopping = True
            await asyncio.wait(tasks, timeout=90)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        alive = {
            name: proc.popen is not None and proc.popen.poll() is None
            for name, proc in procs.items()
        }
    finally:
        for proc in procs.values():
            proc.stop()
    steady = [s for s in samples if s["t"] >= warmup]
    slopes = {
        f"{name}_{what}_per_min": round(
            slope_per_minute([(s["t"], s[f"{name}_{what}"]) for s in steady]), 2
        )
        for name in procs
        for what in ("rss_kib", "fds")
    }
    return {
        "seconds": seconds,
        "interval": interval,
        "warmup": warmup,
        "samples": samples,
        "ops": dict(soak.ops),
        "errors": dict(soak.errors),
        "last_errors": soak.last_error,
        "slopes": slopes,
        "alive": alive,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Soak: {report['seconds'] / 60:g} min, sample every {report['interval']:g} s, "
        f"warm-up {report['warmup'] / 60:g} min",
        "",
        "| t (s) | agent RSS (MiB) | agent fds | server RSS (MiB) | server fds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in report["samples"]:
        lines.append(
            f"| {s['t']:g} | {s['agent_rss_kib'] / 1024:.1f} | {s['agent_fds']} | "
            f"{s['server_rss_kib'] / 1024:.1f} | {s['server_fds']} |"
        )
    lines += ["", f"operations: {report['ops']}", f"errors: {report['errors'] or 'none'}"]
    if report["last_errors"]:
        lines.append(f"last error of each kind: {report['last_errors']}")
    lines.append(f"slopes after warm-up: {report['slopes']}")
    lines.append(f"processes alive at the end: {report['alive']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="duration (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="sampling interval (10)")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds ignored by the slope")
    parser.add_argument("--output", type=Path, default=ARTIFACTS / "soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fluidity-soak-") as directory:
        report = asyncio.run(run(args.seconds, args.interval, args.warmup, Path(directory)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0 if not report["errors"] and all(report["alive"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
