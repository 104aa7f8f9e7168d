"""The agent's listening ports: HTTP proxy and SOCKS5 on one port, told apart by the first byte.

A SOCKS5 greeting starts with 0x05; an HTTP request starts with a method name (ASCII letters).
Each accepted connection waits for its first bytes in a :class:`~.first_read.FirstRead`, which
offers them to the HTTP proxy's :meth:`~.http_proxy.HttpProxy.serve_now` (a task-less CONNECT
tunnel or request relay) and otherwise starts the SOCKS5 or HTTP stream handler, exactly as
``asyncio.start_server`` would have done on accept. Nothing is copied. ``socks_port`` adds a port
that speaks SOCKS5 only.
"""

from __future__ import annotations

import asyncio
import logging

from fluidity.agent.first_read import FirstRead, StreamHandler
from fluidity.agent.http_proxy import HttpProxy
from fluidity.agent.socks5 import SOCKS_VERSION
from fluidity.agent.socks5_frontend import Socks5Frontend

logger = logging.getLogger("fluidity.agent")


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
        # Both loops set TCP_NODELAY on every connection this accepts (tests/integration/
        # test_link_sockets.py), so a 200, an answer head or a SOCKS5 reply goes out at once
        # and nothing here sets socket options (that cost 5 % of the agent per new tunnel).
        server = await loop.create_server(
            lambda: FirstRead(self._dispatch, self.first_byte_timeout, self._serve_now),
            host, port, backlog=backlog,
        )  # fmt: skip
        self.proxy.adopt_server(server)
        return int(server.sockets[0].getsockname()[1])

    async def serve_socks(self, host: str, port: int, *, backlog: int = 1024) -> int:
        """Listen for SOCKS5 clients only on ``host:port``; return the port."""
        # Nothing but SOCKS5 here: a silent client gets the handshake's time limit.
        timeout = self.first_byte_timeout if self.socks is None else self.socks.handshake_timeout
        server = await asyncio.get_running_loop().create_server(
            lambda: FirstRead(self._dispatch_socks_only, timeout, self._serve_socks_now),
            host, port, backlog=backlog,
        )  # fmt: skip
        self._socks_servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    @property
    def socks_addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for s in self._socks_servers for sock in s.sockets]

    @property
    def active_connections(self) -> int:
        socks = 0 if self.socks is None else self.socks.active_connections
        return self.proxy.active_connections + socks

    # --- connections -----------------------------------------------------------------------------

    def _serve_now(self, transport: asyncio.Transport, first: bytes) -> bool:
        """Take the connection without a task if ``first`` allows it (see
        :meth:`HttpProxy.serve_now` and :meth:`Socks5Frontend.serve_now`); False leaves it to
        :meth:`_dispatch`."""
        if first[0] == SOCKS_VERSION:
            return self._serve_socks_now(transport, first)
        return not self._closing and self.proxy.serve_now(transport, first)

    def _serve_socks_now(self, transport: asyncio.Transport, first: bytes) -> bool:
        socks = self.socks
        return socks is not None and not self._closing and socks.serve_now(transport, first)

    def _dispatch_socks_only(self, first: bytes) -> tuple[StreamHandler, int]:
        return self._run_socks, self.read_chunk

    def _dispatch(self, first: bytes) -> tuple[StreamHandler, int]:
        """Choose the handler for a connection from its first bytes; return it and its limit."""
        if first[0] == SOCKS_VERSION and self.socks is not None:
            return self._run_socks, self.proxy.limits.read_chunk
        return self.proxy.handle_connection, self.proxy.limits.read_chunk

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
            if pending:
                return False
        if self.socks is not None:
            remaining = max(0.0, deadline - loop.time())
            return await self.socks.wait_task_less_closed(remaining) and http_done
        return http_done

    async def aclose(self) -> None:
        """Stop accepting, close every connection and wait until they are all gone."""
        self._closing = True
        self.close()
        tasks = list(self._socks_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.socks is not None:
            self.socks.abort_connections()
            await self.socks.wait_task_less_closed(None)  # aborted: gone within a loop turn
        await self.proxy.aclose()
        for server in self._socks_servers:
            await server.wait_closed()
        self._socks_servers.clear()
