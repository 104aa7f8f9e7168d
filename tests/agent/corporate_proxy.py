"""A small authenticating corporate proxy for the tests: HTTP CONNECT with Basic, NTLM, Negotiate.

NTLM and Negotiate are checked by pyspnego's acceptor, whose user database is the file named by
``NTLM_USER_FILE`` (lines ``DOMAIN:user:password``; the ``ntlm_users`` fixture writes it). Only
targets on 127.0.0.1 are dialled. ``behaviour`` makes it misbehave the ways real proxies do:

- ``"normal"``: authenticate with ``schemes``, then tunnel;
- ``"close_after_407"``: like normal, but every 407 carries ``Connection: close`` and the
  connection is closed (connection-based NTLM can never finish: a 407 loop);
- ``"drop_after_407"``: like normal, but close the connection after each 407 without saying so
  (no ``Connection: close``: the client finds out when it sends the next request);
- ``"close_mid_handshake"``: read the CONNECT and close without answering;
- ``"forbidden"``: answer 403 to every CONNECT;
- ``"garbage"``: answer with bytes that are not HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Sequence
from typing import Any, Self

import h11
import spnego
import spnego.exceptions


class CorporateProxy:
    def __init__(
        self,
        schemes: Sequence[str] = ("Basic",),
        *,
        basic_users: dict[str, str] | None = None,
        behaviour: str = "normal",
    ) -> None:
        self.schemes = list(schemes)
        self.basic_users = basic_users if basic_users is not None else {"alice": "s3cret"}
        self.behaviour = behaviour
        self.connect_requests = 0
        self.tunnels = 0
        self.accepted_schemes: list[str] = []
        self.requests_changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_for_requests(self, count: int, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while self.connect_requests < count:
                self.requests_changed.clear()
                await self.requests_changed.wait()

    def _challenges(self) -> list[tuple[str, str]]:
        return [
            ("Proxy-Authenticate", 'Basic realm="corp"' if s == "Basic" else s)
            for s in self.schemes
        ]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        contexts: dict[str, Any] = {}  # per connection, as NTLM requires
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if type(event) is not h11.Request:
                if type(event) is h11.EndOfMessage:
                    continue
                return
            self.connect_requests += 1
            self.requests_changed.set()
            if self.behaviour == "close_mid_handshake":
                return
            if self.behaviour == "garbage":
                writer.write(b"\x00\x01 not http at all\r\n\r\n")
                await writer.drain()
                return
            if event.method != b"CONNECT":
                writer.write(self._send(conn, 405, []))
                return
            if self.behaviour == "forbidden":
                writer.write(self._send(conn, 403, []))
                await writer.drain()
                return
            while type(conn.next_event()) is not h11.EndOfMessage:
                pass
            verdict, extra = self._authenticate(dict(event.headers), contexts)
            if verdict != "ok":
                close = self.behaviour == "close_after_407"
                headers = extra if verdict == "continue" else self._challenges()
                if close:
                    headers = [*headers, ("Connection", "close")]
                writer.write(self._send(conn, 407, headers))
                await writer.drain()
                if close or self.behaviour == "drop_after_407" or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                continue
            await self._tunnel(event.target.decode(), conn, reader, writer, extra)
            return

    def _authenticate(
        self, headers: dict[bytes, bytes], contexts: dict[str, Any]
    ) -> tuple[str, list[tuple[str, str]]]:
        """("ok", headers for the 200), ("continue", the 407's challenge) or ("refuse", [])."""
        value = headers.get(b"proxy-authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme not in self.schemes:
            return "refuse", []
        if scheme == "Basic":
            user, _, password = base64.b64decode(token).decode().partition(":")
            if self.basic_users.get(user) == password:
                self.accepted_schemes.append("Basic")
                return "ok", []
            return "refuse", []
        context = contexts.get(scheme)
        if context is None:
            protocol = "ntlm" if scheme == "NTLM" else "negotiate"
            context = contexts[scheme] = spnego.server(service="HTTP", protocol=protocol)
        try:
            out = context.step(base64.b64decode(token))
        except spnego.exceptions.SpnegoError:
            contexts.pop(scheme, None)
            return "refuse", []
        encoded = base64.b64encode(out).decode() if out else ""
        if context.complete:
            self.accepted_schemes.append(scheme)
            return "ok", [("Proxy-Authenticate", f"{scheme} {encoded}")] if encoded else []
        return "continue", [("Proxy-Authenticate", f"{scheme} {encoded}")]

    def _send(self, conn: h11.Connection, status: int, headers: list[tuple[str, str]]) -> bytes:
        body = f"proxy says {status}\n".encode()
        head = [*headers, ("Content-Length", str(len(body)))]
        return (
            conn.send(h11.Response(status_code=status, headers=head))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )

    async def _tunnel(
        self,
        target: str,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        extra: list[tuple[str, str]],
    ) -> None:
        host, _, port = target.rpartition(":")
        assert host == "127.0.0.1", f"the test proxy only dials 127.0.0.1, not {host}"
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        head = "HTTP/1.1 200 Connection established\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in extra)
        writer.write(head.encode() + b"\r\n")
        self.tunnels += 1
        early, _ = conn.trailing_data
        if early:
            upstream_writer.write(early)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                if sink.can_write_eof():
                    sink.write_eof()

        try:
            await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))
        finally:
            upstream_writer.close()
