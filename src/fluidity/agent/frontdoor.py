"""The agent's listening ports: HTTP proxy and SOCKS5 on one port, told apart by the first byte.

A SOCKS5 greeting starts with 0x05; an HTTP request starts with a method name (ASCII letters). Each
accepted connection first gets a tiny protocol that waits for the first bytes, then builds the
usual asyncio stream reader and writer, moves the transport to them (``set_protocol``), feeds them
those bytes and starts the SOCKS5 or HTTP handler, exactly as ``asyncio.start_server`` would have
done on accept. Nothing is copied or parsed twice. ``socks_port`` adds a port that speaks SOCKS5
only.

Before that, a first read that holds a whole ``CONNECT`` head the proxy can serve at once is
offered to :func:`~fluidity.agent.connect_tunnel.serve_connect_now`, which makes the connection
a task-less tunnel (most open connections of a busy agent are such tunnels).

The client's address is kept in a context variable of the connection's task, so the status page
(loopback only unless configured) and authentication logs can see who is asking.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable

from fluidity.agent.connect_tunnel import serve_connect_now
from fluidity.agent.http_proxy import HttpProxy
from fluidity.agent.socks5 import SOCKS_VERSION
from fluidity.agent.socks5_frontend import Socks5Frontend

logger = logging.getLogger("fluidity.agent")

#: The address of the client whose connection the current task serves (``""`` outside one).
client_address: contextvars.ContextVar[str] = contextvars.ContextVar("fluidity_client", default="")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def current_client() -> str:
    """The address of the client whose connection is being served (``""`` outside one)."""
    return client_address.get()


class FrontDoor:
    """Accepts clients for ``proxy`` (HTTP) and ``socks`` (SOCKS5, or ``None`` to disable it).

    ``first_byte_timeout`` (seconds): a client that sends nothing for this long is closed.
    ``read_chunk`` (bytes): the stream reader limit, as the HTTP proxy uses it.
    """

    def __init__(
        self,
        proxy: HttpProxy,
        socks: Socks5Frontend | None,
        *,
        first_byte_timeout: float = 30.0,
        read_chunk: int = 256 * 1024,
    ) -> None:
        self.proxy = proxy
        self.socks = socks
        self.first_byte_timeout = first_byte_timeout
        self.read_chunk = read_chunk
        self._socks_servers: list[asyncio.Server] = []
        self._socks_tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def serve(self, host: str, port: int, *, backlog: int = 1024) -> int:
        """Listen for HTTP and SOCKS5 clients on ``host:port`` (0 picks a free port); return it.

        The server belongs to the HTTP proxy (its ``close``/``aclose`` stop it, and requests to
        this address are answered locally rather than looped through the tunnel).
        """
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _FirstBytes(self._dispatch, self.first_byte_timeout, self._serve_now),
            host, port, backlog=backlog,
        )  # fmt: skip
        self.proxy.adopt_server(server)
        return int(server.sockets[0].getsockname()[1])

    async def serve_socks(self, host: str, port: int, *, backlog: int = 1024) -> int:
        """Listen for SOCKS5 clients only on ``host:port``; return the port."""
        server = await asyncio.start_server(
            self._socks_only, host, port, limit=self.read_chunk, backlog=backlog
        )
        self._socks_servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    @property
    def socks_addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for s in self._socks_servers for sock in s.sockets]

    @property
    def active_connections(self) -> int:
        return self.proxy.active_connections + len(self._socks_tasks)

    # --- connections -----------------------------------------------------------------------------

    def _serve_now(self, transport: asyncio.Transport, first: bytes) -> bool:
        """Take the connection without a task if ``first`` allows it (a CONNECT, see
        :mod:`~fluidity.agent.connect_tunnel`); False leaves it to :meth:`_dispatch`."""
        if first.startswith(b"CONNECT ") and not self._closing:
            return serve_connect_now(self.proxy, transport, first)
        return False

    def _dispatch(self, first: bytes) -> tuple[StreamHandler, int]:
        """Choose the handler for a connection from its first bytes; return it and its limit."""
        if first[0] == SOCKS_VERSION and self.socks is not None:
            return self._run_socks, self.proxy.limits.read_chunk
        return self.proxy.handle_connection, self.proxy.limits.read_chunk

    async def _socks_only(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_address.set(_peer(writer.get_extra_info("peername")))
        await self._run_socks(reader, writer)

    async def _run_socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        socks = self.socks
        task = asyncio.current_task()
        if socks is None or task is None or self._closing:
            writer.close()
            return
        self._socks_tasks.add(task)
        try:
            await socks.handle(reader, writer)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Cancelled by aclose(): end normally (asyncio 3.11 logs cancelled handler tasks).
        finally:
            self._socks_tasks.discard(task)
            writer.close()

    # --- life cycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting new clients on every port; open connections carry on."""
        self.proxy.close()
        for server in self._socks_servers:
            server.close()

    async def wait_connections_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every client connection (HTTP and SOCKS) to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        http_done = await self.proxy.wait_connections_closed(timeout)
        tasks = list(self._socks_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            return http_done and not pending
        return http_done

    async def aclose(self) -> None:
        """Stop accepting, close every connection and wait until they are all gone."""
        self._closing = True
        self.close()
        tasks = list(self._socks_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.proxy.aclose()
        for server in self._socks_servers:
            await server.wait_closed()
        self._socks_servers.clear()


class _FirstBytes(asyncio.Protocol):
    """Waits for a connection's first bytes, then hands it to stream handlers chosen from them.

    After the hand-over the transport belongs to an ``asyncio.StreamReaderProtocol``, built as
    ``asyncio.start_server`` builds it; this object is dropped. A connection silent for
    ``timeout`` seconds, or closed before sending anything, is closed.
    """

    def __init__(
        self,
        choose: Callable[[bytes], tuple[StreamHandler, int]],
        timeout: float,
        serve_now: Callable[[asyncio.Transport, bytes], bool] | None = None,
    ) -> None:
        self._choose = choose
        self._serve_now = serve_now
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
        self._timer = asyncio.get_running_loop().call_later(self._timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or not data:
            return
        self._transport = None  # handed over: later callbacks go to the stream protocol
        if self._timer is not None:
            self._timer.cancel()
        if self._serve_now is not None and self._serve_now(transport, data):
            return  # the transport has a new protocol
        handler, limit = self._choose(data)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, handler, loop=loop)
        transport.set_protocol(protocol)
        # The handler's task copies the context it is created in, so the client's address is
        # set in a fresh copy around connection_made (which creates the writer and starts the
        # task): no wrapper coroutine per connection (about 450 bytes per open tunnel).
        context = contextvars.copy_context()
        context.run(client_address.set, _peer(transport.get_extra_info("peername")))
        context.run(protocol.connection_made, transport)
        protocol.data_received(data)

    def eof_received(self) -> bool:
        return False  # nothing was sent: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


def _peer(peername: object) -> str:
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""
