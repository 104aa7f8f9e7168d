"""The agent's HTTP/1.1 forward proxy: absolute-form requests, CONNECT and upgrades over streams.

:class:`HttpProxy` listens for clients (browsers, curl, SDKs) and, for every request, opens a byte
stream to the target through a :class:`~fluidity.agent.streams.StreamOpener` (the tunnel in
production, :class:`~fluidity.agent.direct.DirectOpener` in tests). Each client connection is
served by a :class:`~fluidity.agent.http_session.ClientSession`, unless its first bytes let it be
served by event-loop callbacks alone (:meth:`HttpProxy.serve_now`): a CONNECT tunnel
(:mod:`.connect_tunnel`) or a relay of body-less keep-alive requests (:mod:`.request_relay`),
which hands the connection to a session at the first request it does not serve.

Worst-case memory per client connection, with the defaults in brackets: the socket read buffer
(``2 * read_chunk``: asyncio pauses reading above twice its limit), the chunk being forwarded and
the parser's events made from it (``2 * read_chunk``), the socket write buffer (``read_chunk`` plus
the chunk that crossed it) and a request head in progress (``max_header_bytes``): about
``6 * read_chunk + max_header_bytes`` [1.6 MiB]; plus, upstream, ``max_response_header_bytes``
[256 KiB] and the stream's own window. Bodies are never held whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fluidity.agent.connect_tunnel import serve_connect_now
from fluidity.agent.fdlimit import ConnectionGate
from fluidity.agent.first_read import (
    FirstRead,
    StreamHandler,
    TaskLessConnection,
    TaskLessConnections,
    start_stream_handler,
)
from fluidity.agent.http_messages import LocalHandler, LocalResponse
from fluidity.agent.http_session import ClientSession
from fluidity.agent.request_relay import serve_requests_now
from fluidity.agent.streams import StreamOpener

logger = logging.getLogger("fluidity.agent.http")

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

#: Decides whether a proxy request may be served, from its header fields (lowercase names):
#: ``None`` to serve it, or the answer to send instead (e.g. 407 Proxy Authentication Required).
Authorizer = Callable[[Sequence[tuple[bytes, bytes]]], LocalResponse | None]


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds applied to every client connection. Sizes in bytes, times in seconds."""

    #: Whole request head (request line + header fields); larger heads get 431.
    max_header_bytes: int = 64 * 1024
    #: Request line including its CRLF; longer lines get 414.
    max_request_line: int = 8 * 1024
    #: Header fields per request; more get 431.
    max_headers: int = 100
    #: Time from a connection's start (or the first byte of a later request) to a complete request
    #: head: slowloris protection. A partial head gets 408, a silent connection is just closed.
    header_read_timeout: float = 30.0
    #: Time a keep-alive client connection may sit between requests, and the longest pause
    #: allowed while reading a request body, before it is closed.
    idle_timeout: float = 120.0
    #: Bytes per read from the client; also the client socket's read and write buffer bound.
    read_chunk: int = 256 * 1024
    #: Largest response head accepted from an origin; a larger one gets 502.
    max_response_header_bytes: int = 256 * 1024
    #: Client connections served at once (0: no limit); more are answered 503 and closed, so that
    #: running out of file descriptors gets an answer, not a reset (see :mod:`.fdlimit`).
    max_connections: int = 0


class HttpProxy:
    """An HTTP/1.1 forward proxy whose upstream connections are streams from ``opener``.

    Origin-form requests (``GET /path``) are addressed to the proxy itself: they go to
    ``local_handler`` when given, and otherwise get a 400 explaining how to use a proxy. The same
    happens to absolute-form requests naming the proxy's own listening address, which would
    otherwise loop.

    Proxy requests (absolute-form and CONNECT) are first shown to ``authorizer`` when given: it
    returns ``None`` to let the request through, or the answer to send instead (a 407).

    Counters (plain ints, read them freely): ``active_connections``, ``total_connections``,
    ``requests`` (request heads parsed) and ``open_failures`` (streams that could not be opened).
    """

    def __init__(
        self,
        opener: StreamOpener,
        limits: ProxyLimits | None = None,
        local_handler: LocalHandler | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.opener = opener
        self.limits = limits or ProxyLimits()
        self.local_handler = local_handler
        self.authorizer = authorizer
        self.active_connections = 0
        self.total_connections = 0
        limit = self.limits.max_connections
        self._gate = ConnectionGate(limit) if limit else None
        self.requests = 0
        self.open_failures = 0
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._task_less: TaskLessConnections[TaskLessConnection] = TaskLessConnections()
        self._own_addresses: set[tuple[str, int]] = set()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 8080, *, backlog: int = 1024
    ) -> asyncio.Server:
        """Start accepting clients on ``host:port`` (port 0 picks a free one); return the server.

        Call several times to listen on several addresses; :meth:`close` stops them all.
        """
        timeout = self.limits.header_read_timeout
        server = await asyncio.get_running_loop().create_server(
            lambda: FirstRead(self._choose_handler, timeout, self.serve_now), host, port,
            backlog=backlog,
        )  # fmt: skip
        self.adopt_server(server)
        return server

    def _choose_handler(self, first: bytes) -> tuple[StreamHandler, int]:
        return self.handle_connection, self.limits.read_chunk

    def serve_now(self, transport: asyncio.Transport, first: bytes) -> bool:
        """Serve a new connection without a task if its first read ``first`` allows: a CONNECT
        tunnel or a request relay. False: nothing happened, serve it with
        :meth:`handle_connection`."""
        if first.startswith(b"CONNECT "):
            return serve_connect_now(self, transport, first)
        return serve_requests_now(self, transport, first, self._hand_to_session)

    def _hand_to_session(self, transport: asyncio.Transport, data: bytes, eof: bool) -> None:
        limit = self.limits.read_chunk
        start_stream_handler(transport, self.handle_connection, limit, data, eof=eof)

    def adopt_server(self, server: asyncio.Server) -> None:
        """Treat ``server`` as one of this proxy's listeners (one that calls
        :meth:`handle_connection`, e.g. the agent's front door): :meth:`close` stops it and
        requests naming its address are answered locally."""
        self._servers.append(server)
        for sock in server.sockets:
            address = sock.getsockname()
            bound = address[0]
            names = (
                _LOOPBACK_NAMES if bound in ("0.0.0.0", "::") or bound in _LOOPBACK_NAMES else ()
            )
            self._own_addresses.update((name, address[1]) for name in (bound, *names))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every listening socket."""
        return [sock.getsockname()[:2] for s in self._servers for sock in s.sockets]

    def is_own_address(self, host: str, port: int) -> bool:
        """True if ``host:port`` is where this proxy listens (a request there would loop)."""
        return (host.lower(), port) in self._own_addresses

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection until it closes (usable with any asyncio stream server)."""
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        self.active_connections += 1
        self.total_connections += 1
        try:
            if self._gate is not None and self._gate.full(self.active_connections):
                await self._gate.refuse(reader, writer)
                return
            transport = writer.transport
            transport.set_write_buffer_limits(high=self.limits.read_chunk)
            await ClientSession(self, reader, writer).run()
        except asyncio.CancelledError:
            if task not in self._closing:
                raise
            # Cancelled by close_connections(): end normally, as asyncio (3.11) logs an error for
            # a cancelled stream-handler task.
        finally:
            self.active_connections -= 1
            self._sessions.discard(task)
            self._closing.discard(task)

    # --- task-less connections (serve_now) ----------------------------------------------------

    @property
    def task_less_connections(self) -> int:
        """Open client connections served without a task: CONNECT tunnels and request relays
        (counted in ``active_connections`` too)."""
        return len(self._task_less)

    def admits_another(self) -> bool:
        """True if one more client connection stays within ``max_connections``."""
        return self._gate is None or not self._gate.full(self.active_connections + 1)

    def adopt_connection(self, connection: TaskLessConnection) -> None:
        """Count ``connection`` as a client connection until it closes or is handed over."""
        self._task_less.add(connection)
        self.active_connections += 1
        self.total_connections += 1

    def connection_closed(self, connection: TaskLessConnection) -> None:
        """``connection`` is gone (or went to a session, which counts it anew)."""
        if self._task_less.discard(connection):
            self.active_connections -= 1

    # --- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting new clients; connections already open keep being served."""
        for server in self._servers:
            server.close()

    async def wait_connections_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every client connection to end; True if they did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sessions = list(self._sessions)
        if sessions:
            _, pending = await asyncio.wait(sessions, timeout=timeout)
            if pending:
                return False
        return await self._task_less.wait_closed(max(0.0, deadline - loop.time()))

    def close_connections(self) -> None:
        """Close every client connection now (and the streams they use)."""
        for task in list(self._sessions):
            self._closing.add(task)
            task.cancel()
        self._task_less.abort_all()

    async def aclose(self) -> None:
        """Stop accepting, close every connection and wait until they are all gone."""
        self.close()
        sessions = list(self._sessions)
        self.close_connections()
        await asyncio.gather(*sessions, return_exceptions=True)
        await self._task_less.wait_closed(None)  # aborted transports report their loss next turn
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._own_addresses.clear()


__all__ = ["Authorizer", "HttpProxy", "LocalHandler", "ProxyLimits", "logger"]
