"""The server's loopback health endpoint, and the client ``fluidity server healthcheck`` runs.

Why not probe port 8443: the server only completes a handshake with a client certificate signed by
its CA, so a probe there either carries an agent certificate into the image or fails every time
(the Go original curled plain HTTP on the mTLS port, so every task was unhealthy), and each probe
would log a refused handshake. Instead the server answers on ``127.0.0.1:<health_port>`` (never
another address) with one HTTP/1.0 response:

- ``200`` and ``{"status": "ok", ...}`` while the listener socket is open and its accept loop runs;
- ``503`` and ``{"status": "draining"}`` once SIGTERM was received, or
  ``{"status": "not_accepting"}`` if the listener was closed or its accept loop died.

The endpoint runs on the same event loop as the listener, so a wedged loop does not answer and the
check times out; a dead process refuses the connection. Both count as unhealthy. The response
carries counts only (links, streams), nothing about agents or targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fluidity.logs import log
from fluidity.server.listener import Server

logger = logging.getLogger("fluidity.server")

HEALTH_ADDR = "127.0.0.1"
"""The health endpoint listens on loopback only: it is for the container's own health check."""
_MAX_REQUEST = 4096  # bytes of request head read before answering; the answer ignores them
_READ_TIMEOUT = 2.0  # seconds a health client has to send its request head


def health_report(server: Server, draining: bool) -> tuple[int, dict[str, object]]:
    """The HTTP status and JSON body describing ``server`` right now."""
    snapshot = server.stats.snapshot()
    if draining:
        status, code = "draining", 503
    elif not server.accepting:
        status, code = "not_accepting", 503
    else:
        status, code = "ok", 200
    body: dict[str, object] = {
        "status": status,
        "listen_port": server.port if server.accepting else server.config.listen_port,
        "links": snapshot.active_connections,
        "streams": snapshot.active_streams,
    }
    return code, body


class HealthEndpoint:
    """A tiny HTTP/1.0 responder on ``127.0.0.1:port`` reporting :func:`health_report`."""

    def __init__(self, server: Server, port: int, draining: Callable[[], bool]) -> None:
        self._server = server
        self._port = port
        self._draining = draining
        self._listener: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when ``health_port`` is not fixed in tests)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind the loopback port; a port in use is a clear configuration error."""
        from fluidity.errors import ConfigError

        try:
            self._listener = await asyncio.start_server(
                self._answer, HEALTH_ADDR, self._port, limit=_MAX_REQUEST
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for health checks on {HEALTH_ADDR}:{self._port}: {exc.strerror} "
                "(set health_port to a free port, or 0 to turn the endpoint off)"
            ) from None
        log(logger, logging.INFO, "health.listening", addr=f"{HEALTH_ADDR}:{self.port}")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            code, body = health_report(self._server, self._draining())
            payload = json.dumps(body).encode()
            reason = "OK" if code == 200 else "Service Unavailable"
            writer.write(
                f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclass(frozen=True)
class HealthResult:
    """What :func:`check_health` found: ``healthy`` and a one-line ``detail`` for people."""

    healthy: bool
    detail: str


def check_health(port: int, timeout: float) -> HealthResult:
    """Ask the health endpoint on ``127.0.0.1:port``; unhealthy on any failure, within ``timeout``.

    Blocking (no event loop): it runs in its own short-lived process as the container health check.
    """
    try:
        with socket.create_connection((HEALTH_ADDR, port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks: list[bytes] = []
            while sum(len(c) for c in chunks) < 64 * 1024 and (chunk := sock.recv(4096)):
                chunks.append(chunk)
    except TimeoutError:
        return HealthResult(False, f"no answer from {HEALTH_ADDR}:{port} within {timeout:g}s")
    except OSError as exc:
        return HealthResult(
            False, f"cannot reach {HEALTH_ADDR}:{port}: {exc.strerror or exc} (server not running?)"
        )
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    try:
        body = json.loads(payload)
        state = str(body["status"])
    except (ValueError, KeyError, TypeError):
        return HealthResult(False, f"unexpected answer from {HEALTH_ADDR}:{port}: {status_line!r}")
    healthy = len(parts) >= 2 and parts[1] == "200" and state == "ok"
    detail = (
        f"{state}: listen_port={body.get('listen_port')} links={body.get('links')} "
        f"streams={body.get('streams')}"
    )
    return HealthResult(healthy, detail)
