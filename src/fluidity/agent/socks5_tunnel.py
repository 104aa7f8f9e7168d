"""SOCKS5 connections served by event-loop callbacks: the handshake, the open, then a tunnel.

The task-based :meth:`~fluidity.agent.socks5_frontend.Socks5Frontend.handle` keeps a task, an
asyncio stream reader and writer and the pipe's coroutines for the whole life of a connection;
most SOCKS5 connections are long-lived tunnels (a browser set to SOCKS5 sends everything through
them). :class:`Socks5Connection` runs the same sans-I/O :class:`~fluidity.agent.socks5.
Socks5Handshake` from the transport's callbacks, opens the stream without waiting when a link is
up (the opener's ``open_now``; otherwise one short task waits for the open, as the task-based
handler would), replies, and then gives the transport to a
:class:`~fluidity.agent.connect_tunnel.ConnectTunnel`, which carries the bytes both ways with
half-close and backpressure, and resets the client if the stream fails.

Behaviour and logs are the task-based handler's: the same replies, ``handshake_timeout`` for
greeting, login and request together, the answer flushed and the connection half-closed before
closing after a refusal, bytes sent behind the request forwarded once the stream is open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fluidity.agent.connect_tunnel import ConnectTunnel
from fluidity.agent.first_read import peer_host
from fluidity.agent.http_messages import format_target
from fluidity.agent.socks5 import ConnectRequest, HandshakeFailed, Reply, Socks5Handshake, reply_for
from fluidity.agent.streams import PushStream, StreamOpenError
from fluidity.logs import log

if TYPE_CHECKING:
    from fluidity.agent.socks5_frontend import Socks5Frontend

logger = logging.getLogger("fluidity.agent.socks")


class Socks5Connection(asyncio.Protocol):
    """A SOCKS5 client connection until its tunnel starts (then a ``ConnectTunnel`` is the
    transport's protocol) or it is refused."""

    __slots__ = (
        "_client",
        "_client_ended",
        "_frontend",
        "_handshake",
        "_opening",
        "_stream",
        "_target",
        "_timer",
        "_transport",
        "closed",
    )

    def __init__(self, frontend: Socks5Frontend, transport: asyncio.Transport) -> None:
        self._frontend = frontend
        self._transport = transport
        self._handshake = Socks5Handshake(frontend.check_credentials)
        self._client = peer_host(transport.get_extra_info("peername")) or "unknown"
        self._stream: PushStream | None = None
        self._target = ""
        self._opening: asyncio.Task[None] | None = None  # only while waiting for a link
        self._client_ended = False
        self.closed = False
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            frontend.handshake_timeout, self._handshake_timed_out
        )

    def abort(self) -> None:
        """Cut the connection now (the agent is shutting down)."""
        self._finish()
        self._transport.abort()

    # --- the client's transport ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol() on a connected transport: the first bytes follow at once

    def data_received(self, data: bytes) -> None:
        handshake = self._handshake
        waiting = self._target != ""  # the request is in: bytes now are for the target
        event = handshake.receive_data(data)
        if waiting:
            return  # kept by the handshake as trailing data until the stream is open
        if out := handshake.data_to_send():
            self._transport.write(out)
        if isinstance(event, HandshakeFailed):
            self._refused(event)
        elif isinstance(event, ConnectRequest):
            self._open(event)

    def eof_received(self) -> bool:
        if not self._target:
            return False  # the handshake is not complete: close
        self._client_ended = True  # passed on to the tunnel once it starts
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    # --- the open --------------------------------------------------------------------------------

    def _open(self, request: ConnectRequest) -> None:
        self._cancel_timer()  # the timeout covers the handshake only, as in the task-based handler
        self._target = format_target(request.host, request.port)
        stream: PushStream | None = self._frontend.opener.open_now(  # type: ignore[attr-defined]
            request.host, request.port
        )
        if stream is None:
            self._opening = asyncio.ensure_future(self._open_waiting(request))
            return
        self._stream = stream
        stream.push_to(self)

    async def _open_waiting(self, request: ConnectRequest) -> None:
        """No link up now: wait for one (and the open) in a task, as the task-based handler does."""
        try:
            stream = await self._frontend.opener.open(request.host, request.port)
        except StreamOpenError as exc:
            self.stream_error(exc)
            return
        finally:
            self._opening = None
        if self.closed:
            stream.close()
            return
        assert isinstance(stream, PushStream)  # openers with open_now open pushing streams
        self._stream = stream
        stream.push_to(self)

    # --- the stream (StreamConsumer), until the tunnel takes it ----------------------------------

    def stream_open(self) -> None:
        stream = self._stream
        if self.closed or stream is None:
            return
        handshake = self._handshake
        handshake.reply(Reply.SUCCEEDED)
        transport = self._transport
        transport.write(handshake.data_to_send())
        early = handshake.trailing_data
        self.closed = True  # the tunnel owns the connection from now on
        self._stream = None
        tunnel = ConnectTunnel(self._frontend, transport, stream, self._target, greeting=b"")
        self._frontend.tunnel_started(self, tunnel)
        transport.set_write_buffer_limits(high=self._frontend.read_chunk)
        transport.set_protocol(tunnel)
        tunnel.start(early)
        if self._client_ended:
            tunnel.eof_received()

    def stream_data(self, data: memoryview) -> None:
        raise AssertionError("no data before the open result")

    def stream_eof(self) -> None:
        raise AssertionError("no EOF before the open result")

    def stream_error(self, error: StreamOpenError) -> None:
        self._stream = None
        if self.closed:
            return
        frontend = self._frontend
        frontend.open_failures += 1
        code = reply_for(error.failure)
        log(logger, logging.INFO, "socks.open_failed", target=self._target,
            reason=error.failure.value, reply=f"{code:#04x}")  # fmt: skip
        self._handshake.reply(code)
        self._transport.write(self._handshake.data_to_send())
        self._close_after_answer()

    # --- endings ---------------------------------------------------------------------------------

    def _refused(self, event: HandshakeFailed) -> None:
        frontend = self._frontend
        if event.auth:
            frontend.auth_failures += 1
            log(logger, logging.INFO, "socks.auth_failed", client=self._client, reason=event.reason)
        else:
            log(logger, logging.DEBUG, "socks.bad_handshake", client=self._client,
                reason=event.reason)  # fmt: skip
        self._close_after_answer()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        log(logger, logging.DEBUG, "socks.handshake_timeout", client=self._client)
        self._transport.close()

    def _close_after_answer(self) -> None:
        """Half-close, so the client reads the answer rather than a reset, then close."""
        self._cancel_timer()
        transport = self._transport
        if transport.can_write_eof():
            transport.write_eof()
        transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self._opening is not None:
            self._opening.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.push_to(None)
            stream.close()
        self._frontend.connection_closed(self)


def serve_socks_now(frontend: Socks5Frontend, transport: asyncio.Transport, first: bytes) -> bool:
    """Serve a connection whose first read is ``first`` with a :class:`Socks5Connection` if the
    opener can open streams without a task; return whether it was taken."""
    if getattr(frontend.opener, "open_now", None) is None:
        return False
    connection = Socks5Connection(frontend, transport)
    frontend.adopt_connection(connection)
    transport.set_protocol(connection)
    connection.data_received(first)
    return True
