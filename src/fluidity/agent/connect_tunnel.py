"""CONNECT tunnels served by event-loop callbacks alone: no task, no stream reader or writer.

Thousands of CONNECT tunnels sit open at once (a browser keeps dozens per site), and each one
served by a :class:`~fluidity.agent.http_session.ClientSession` holds a task, its coroutine
frames, an asyncio stream reader, protocol and writer, and the session's request parser: about
4 KB, and the setting up of all that per tunnel. A tunnel is a small job (forward bytes both ways,
honour half-close, pass backpressure on), so when a connection's first read holds a whole
``CONNECT`` head that can be served at once, :func:`serve_connect_now` takes the connection and
:class:`ConnectTunnel` becomes its transport's protocol, for the tunnel's whole life.

"At once" means: the proxy has no authorizer (a 407 keeps the connection for the client's retry,
which is the session's job), the connection limit is not near, and the opener can start a stream
without waiting (:class:`~fluidity.agent.streams.ImmediateOpener`: a link is up). Anything else
(a partial or invalid head, no link yet, a waking server) is left to the session, which serves
every case; the bytes are then parsed a second time, which only costs on those rare paths.

Behaviour is the session's: ``200 Connection established`` once the target accepted the stream,
the error answer the session would send (and ``Connection: close``) if it did not, half-close in
both directions, and a reset (RST) to the client when the stream fails after the 200, since a FIN
would tell it the data ended normally.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from fluidity.agent.http_codec import ProtocolError, RequestHead, RequestReader
from fluidity.agent.http_exchange import answer
from fluidity.agent.http_messages import (
    BadRequestError,
    HeadScanner,
    failure_status,
    failure_text,
    parse_connect_target,
    request_body_framing,
)
from fluidity.agent.pipe import reset_connection
from fluidity.agent.streams import PushStream, StreamOpenError

if TYPE_CHECKING:
    from fluidity.agent.http_proxy import HttpProxy

logger = logging.getLogger("fluidity.agent.http")

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


class TunnelOwner(Protocol):
    """Who counts a tunnel's connection: the HTTP proxy, or the SOCKS5 front end."""

    #: Streams that could not be opened (the tunnel adds its own failed open).
    open_failures: int

    def connection_closed(self, connection: ConnectTunnel) -> None:
        """``connection``'s client connection is gone."""


def serve_connect_now(proxy: HttpProxy, transport: asyncio.Transport, first: bytes) -> bool:
    """Serve the connection as a task-less tunnel if ``first`` (its first read) allows; return
    whether it was taken. When not, nothing has happened: hand ``first`` to the session."""
    if proxy.authorizer is not None or not proxy.admits_another() or b"\r\n\r\n" not in first:
        return False
    open_now = getattr(proxy.opener, "open_now", None)  # an ImmediateOpener's
    if open_now is None:
        return False
    limits = proxy.limits
    scanner = HeadScanner(limits.max_request_line, limits.max_headers, limits.max_header_bytes)
    if scanner.feed(first) is not None:
        return False
    requests = RequestReader(limits.max_request_line, limits.max_headers, limits.max_header_bytes)
    try:
        requests.receive_data(first)
        head = requests.next_event()
    except ProtocolError:
        return False
    if (
        type(head) is not RequestHead
        or head.method != b"CONNECT"
        or len(head.method) + len(head.target) + 12 > limits.max_request_line
        or request_body_framing(head.headers) not in (None, 0)
    ):
        return False
    try:
        target = parse_connect_target(head.target)
    except BadRequestError:
        return False
    stream: PushStream | None = open_now(target.host, target.port)
    if stream is None:
        return False
    early, _ = requests.trailing_data
    tunnel = ConnectTunnel(proxy, transport, stream, target.display)
    transport.set_write_buffer_limits(high=limits.read_chunk)
    proxy.adopt_connection(tunnel)
    proxy.requests += 1
    transport.set_protocol(tunnel)
    tunnel.start(early)
    return True


class ConnectTunnel(asyncio.Protocol):
    """One CONNECT tunnel: the client transport's protocol and its stream's consumer.

    Client -> stream: each read is written to the stream; while the stream holds more than its
    buffer (``tunnel.stream_buffer``) the client is not read. Stream -> client: pushed bytes are
    written to the client and their window released at once, unless the client's write buffer is
    over its high-water mark (``read_chunk``); then the window is held back until it drains, so
    the client buffer holds at most that mark plus one stream window.
    """

    __slots__ = (
        "_client_ended",
        "_greeting",
        "_opened",
        "_owner",
        "_read_paused",
        "_stream",
        "_stream_ended",
        "_target",
        "_transport",
        "_withheld",
        "_write_paused",
        "closed",
        "received",
        "sent",
    )

    def __init__(
        self,
        owner: TunnelOwner,
        transport: asyncio.Transport,
        stream: PushStream,
        target: str,
        *,
        greeting: bytes = CONNECT_OK,
    ) -> None:
        self._owner = owner
        self._greeting = greeting  # sent once the stream is open (SOCKS5 replied already)
        self._transport = transport
        self._stream = stream
        self._target = target
        self._opened = False
        self._client_ended = False  # the client sent EOF (passed on as the stream's EOF)
        self._stream_ended = False  # the stream's EOF was passed on to the client
        self._read_paused = False
        self._write_paused = False
        self._withheld = 0  # bytes written to the client whose window is not released yet
        self.closed = False
        self.sent = 0  # bytes from the client to the stream
        self.received = 0  # bytes from the stream to the client

    def start(self, early: bytes) -> None:
        """Begin: bytes the client sent behind the head go out as soon as the stream opens."""
        stream = self._stream
        stream.on_writable(self._stream_writable)
        if early:
            self.sent += len(early)
            stream.write(early)  # the stream queues it until the open result
        stream.push_to(self)

    def abort(self) -> None:
        """Cut the tunnel now (the proxy is shutting down): reset both sides."""
        self._stream.close()
        self._transport.abort()

    # --- the client's transport ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol() on a connected transport: start() takes over

    def data_received(self, data: bytes) -> None:
        stream = self._stream
        self.sent += len(data)
        stream.write(data)
        if stream.write_blocked and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._client_ended = True
        self._stream.write_eof()
        if self._stream_ended:
            self._transport.close()
        # Keep the transport for the stream's direction until it ends too (half-close).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        # close() resets the stream unless both directions had ended cleanly.
        stream = self._stream
        stream.on_writable(None)
        stream.push_to(None)
        stream.close()
        self._owner.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        withheld, self._withheld = self._withheld, 0
        if withheld and not self.closed:
            self._stream.release(withheld)

    # --- the stream (StreamConsumer) -------------------------------------------------------------

    def stream_open(self) -> None:
        self._opened = True
        if not self.closed and self._greeting:
            self._transport.write(self._greeting)

    def stream_data(self, data: memoryview) -> None:
        transport = self._transport
        n = len(data)
        self.received += n
        if self.closed or transport.is_closing():
            self._stream.release(n)
            return
        transport.write(data)
        if self._write_paused:
            self._withheld += n
        else:
            self._stream.release(n)

    def stream_eof(self) -> None:
        self._stream_ended = True
        transport = self._transport
        if self.closed or transport.is_closing():
            return
        if self._client_ended or not transport.can_write_eof():
            transport.close()  # both directions have ended
        else:
            transport.write_eof()

    def stream_error(self, error: StreamOpenError) -> None:
        if self.closed:
            return
        if self._opened:
            reset_connection(self._transport)
            return
        # The open failed: answer as the session would, then close.
        self._owner.open_failures += 1
        logger.info("http.open_failed target=%s reason=%s", self._target, error.failure.value)
        status = failure_status(error.failure)
        body = failure_text(self._target, error.failure, error.message).encode()
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        transport = self._transport
        transport.writelines(answer(status, headers, body, close=True, head_request=False))
        transport.close()

    def _stream_writable(self) -> None:
        if (
            self._read_paused
            and not self.closed
            and not self._transport.is_closing()
            and not self._stream.write_blocked
        ):
            self._read_paused = False
            self._transport.resume_reading()
