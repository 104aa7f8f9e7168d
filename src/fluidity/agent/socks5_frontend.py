"""The asyncio shell around :class:`~fluidity.agent.socks5.Socks5Handshake` for the agent.

:class:`Socks5Frontend` runs the handshake on a client connection, opens a tunnel stream for the
CONNECT target, replies with the code that matches the open's result, then pipes bytes both ways
(:func:`fluidity.agent.pipe.pipe`). A tunnel that ends badly is closed with an RST, as ``CONNECT``
tunnels of the HTTP proxy are.

With an opener that opens pushing streams (the tunnel), :meth:`Socks5Frontend.serve_now` serves
the connection from callbacks instead (:mod:`.socks5_tunnel`): no task, no stream reader or
writer, the same replies. :meth:`Socks5Frontend.handle` remains for other openers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fluidity.agent.connect_tunnel import ConnectTunnel
from fluidity.agent.first_read import TaskLessConnections
from fluidity.agent.http_messages import format_target
from fluidity.agent.pipe import pipe, reset_connection
from fluidity.agent.socks5 import HandshakeFailed, Reply, Socks5Handshake, reply_for
from fluidity.agent.socks5_tunnel import Socks5Connection, serve_socks_now
from fluidity.agent.streams import StreamOpener, StreamOpenError
from fluidity.logs import log

logger = logging.getLogger("fluidity.agent.socks")


class Socks5Frontend:
    """Serves SOCKS5 client connections over streams from ``opener`` (the tunnel).

    ``handshake_timeout`` (seconds) bounds greeting, login and request together; ``read_chunk``
    (bytes) bounds each read while piping. Counters for the status page: ``active_connections``,
    ``total_connections``, ``open_failures``, ``auth_failures``, ``bytes_sent`` (client to
    target) and ``bytes_received`` (target to client) of finished connections.
    """

    def __init__(
        self,
        opener: StreamOpener,
        *,
        check_credentials: Callable[[bytes, bytes], bool] | None = None,
        handshake_timeout: float = 10.0,
        read_chunk: int = 256 * 1024,
    ) -> None:
        self.opener = opener
        self.check_credentials = check_credentials
        self.handshake_timeout = handshake_timeout
        self.read_chunk = read_chunk
        self.active_connections = 0
        self.total_connections = 0
        self.open_failures = 0
        self.auth_failures = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        # Connections served from callbacks: handshakes, then their tunnels.
        self._task_less: TaskLessConnections[Socks5Connection | ConnectTunnel]
        self._task_less = TaskLessConnections()

    # --- task-less connections (socks5_tunnel) ---------------------------------------------------

    def serve_now(self, transport: asyncio.Transport, first: bytes) -> bool:
        """Serve a new connection from callbacks if the opener allows; False: use :meth:`handle`."""
        return serve_socks_now(self, transport, first)

    @property
    def task_less_connections(self) -> int:
        """Open connections served without a task (counted in ``active_connections`` too)."""
        return len(self._task_less)

    def adopt_connection(self, connection: Socks5Connection) -> None:
        self._task_less.add(connection)
        self.active_connections += 1
        self.total_connections += 1

    def tunnel_started(self, connection: Socks5Connection, tunnel: ConnectTunnel) -> None:
        """``connection``'s handshake is done: ``tunnel`` carries it on (the same connection)."""
        self._task_less.discard(connection)
        self._task_less.add(tunnel)

    def connection_closed(self, connection: Socks5Connection | ConnectTunnel) -> None:
        """A task-less connection is gone."""
        if not self._task_less.discard(connection):
            return
        self.active_connections -= 1
        if isinstance(connection, ConnectTunnel):
            self.bytes_sent += connection.sent
            self.bytes_received += connection.received

    def abort_connections(self) -> None:
        """Cut every task-less connection now (shutdown)."""
        self._task_less.abort_all()

    async def wait_task_less_closed(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the task-less connections to end; True if they did."""
        return await self._task_less.wait_closed(timeout)

    # --- task-based connections ------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until it ends (usable with any asyncio stream server)."""
        self.active_connections += 1
        self.total_connections += 1
        try:
            await self._serve(reader, writer)
        except (OSError, StreamOpenError):
            pass  # the client or the stream went away: closing is all that is left
        finally:
            self.active_connections -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshake = Socks5Handshake(self.check_credentials)
        client = _peer(writer)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                event = None
                while event is None:
                    data = await reader.read(4096)
                    if not data:
                        return
                    event = handshake.receive_data(data)
                    if event is None:
                        writer.write(handshake.data_to_send())
        except TimeoutError:
            log(logger, logging.DEBUG, "socks.handshake_timeout", client=client)
            return
        writer.write(handshake.data_to_send())
        if isinstance(event, HandshakeFailed):
            if event.auth:
                self.auth_failures += 1
                log(logger, logging.INFO, "socks.auth_failed", client=client, reason=event.reason)
            else:
                log(logger, logging.DEBUG, "socks.bad_handshake", client=client,
                    reason=event.reason)  # fmt: skip
            await _flush_and_close(writer)
            return
        target = format_target(event.host, event.port)
        try:
            stream = await self.opener.open(event.host, event.port)
        except StreamOpenError as exc:
            await self._refuse(handshake, writer, target, exc)
            return
        try:
            try:
                await stream.wait_open()
            except StreamOpenError as exc:
                await self._refuse(handshake, writer, target, exc)
                return
            handshake.reply(Reply.SUCCEEDED)
            writer.write(handshake.data_to_send())
            if early := handshake.trailing_data:
                stream.write(early)
            result = await pipe(reader, writer, stream, read_chunk=self.read_chunk)
            self.bytes_sent += result.sent + len(early)
            self.bytes_received += result.received
            if not result.clean:
                reset_connection(writer.transport)
        finally:
            stream.close()

    async def _refuse(
        self,
        handshake: Socks5Handshake,
        writer: asyncio.StreamWriter,
        target: str,
        exc: StreamOpenError,
    ) -> None:
        self.open_failures += 1
        code = reply_for(exc.failure)
        log(logger, logging.INFO, "socks.open_failed", target=target, reason=exc.failure.value,
            reply=f"{code:#04x}")  # fmt: skip
        handshake.reply(code)
        writer.write(handshake.data_to_send())
        await _flush_and_close(writer)


async def _flush_and_close(writer: asyncio.StreamWriter) -> None:
    """Send what is queued and half-close, so the client reads the answer rather than a reset."""
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown"
