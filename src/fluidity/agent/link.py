"""One agent-side link: the asyncio shell around a :class:`~fluidity.wire.Session`.

It turns session events into the state of :class:`LinkStream` objects, which give the front ends
an async read/write/drain API (:class:`~fluidity.agent.streams.TunnelStream`).

Memory per stream is bounded: received bytes wait in the stream until read, and the server may
send at most ``stream_window`` bytes before :meth:`LinkStream.read` returns credit; written bytes
wait in the session, and :meth:`LinkStream.drain` blocks while more than ``stream_buffer`` are
queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from fluidity.agent.streams import OpenFailure, PushStream, StreamConsumer, StreamOpenError
from fluidity.link_protocol import LinkProtocol
from fluidity.logs import log
from fluidity.wire import (
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    Keepalive,
    KeepaliveAction,
    LinkReady,
    PongReceived,
    ProtocolError,
    Role,
    Session,
    SessionSettings,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamReset,
)

logger = logging.getLogger("fluidity.agent")

_FAILURES = {
    ErrorCode.REFUSED: OpenFailure.REFUSED,
    ErrorCode.DNS_FAILURE: OpenFailure.DNS,
    ErrorCode.TIMEOUT: OpenFailure.TIMEOUT,
    ErrorCode.DENIED: OpenFailure.DENIED,
    ErrorCode.LIMIT: OpenFailure.LIMIT,
    ErrorCode.UNREACHABLE: OpenFailure.UNREACHABLE,
    ErrorCode.GOING_AWAY: OpenFailure.TUNNEL_DOWN,
    ErrorCode.CONNECTION_LOST: OpenFailure.RESET,
}


class AgentLink(LinkProtocol):
    """Protocol object of the TLS connection to the server."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        stream_buffer: int,
        keepalive_interval: float,
        keepalive_timeout: float,
        name: str,
    ) -> None:
        super().__init__(Session(Role.AGENT, settings, clock=time.monotonic))
        self.streams: dict[int, LinkStream] = {}
        self.stream_buffer = stream_buffer
        self.name = name
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self.draining = False  # the server sent GOAWAY: open nothing new here
        # Resolves when the link stops taking new streams (GOAWAY or closed).
        self.retired: asyncio.Future[None] = self._loop.create_future()
        self.rtt_ms: float | None = None
        self.close_reason = ""
        self._keepalive = Keepalive(keepalive_interval, keepalive_timeout, self._loop.time())
        self._timer: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.ready.done() and not self.closed.done() and not self.draining

    # --- transport callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._arm_keepalive()
        self.flush()

    def buffer_updated(self, nbytes: int) -> None:
        self._keepalive.received(self._loop.time())
        try:
            events = self.session.receive_buffered(nbytes)
        except ProtocolError as exc:
            self._fail(f"protocol error from server: {exc}")
            return
        streams = self.streams
        for event in events:
            if type(event) is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.feed(event.data)
            elif type(event) is StreamOpened:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.set_opened()
            elif type(event) is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.feed_eof()
            elif type(event) is StreamOpenFailed:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    failure = _FAILURES.get(event.code, OpenFailure.ERROR)
                    stream.set_error(StreamOpenError(failure, event.message or event.code.name))
            elif type(event) is StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    message = event.message or event.code.name.lower()
                    stream.set_error(StreamOpenError(OpenFailure.RESET, f"reset: {message}"))
            elif type(event) is LinkReady:
                if not self.ready.done():
                    self.ready.set_result(None)
            elif type(event) is PongReceived:
                sent = int.from_bytes(event.payload, "big")
                self.rtt_ms = (time.monotonic_ns() - sent) / 1e6
            elif type(event) is GoAwayReceived:
                self._goaway(event)
        if self.session.has_data_to_send():  # credit, answers; most reads queue nothing
            self.request_flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        reason = self.close_reason or (
            f"connection lost: {exc}" if exc else "server closed the link"
        )
        error = StreamOpenError(OpenFailure.LINK_LOST, f"link to the server lost ({reason})")
        for stream in list(self.streams.values()):
            stream.set_error(error)
        self.streams.clear()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # retrieved by whoever awaits; avoid "never retrieved"
        if not self.closed.done():
            self.closed.set_result(reason)
        self._retire()

    # --- sending (LinkProtocol) ----------------------------------------------------------------

    def stream_drained(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.wake_writer()

    # --- streams ---------------------------------------------------------------------------------

    def open_stream(self, host: str, port: int) -> LinkStream:
        stream_id = self.session.open_stream(host, port)
        stream = LinkStream(self, stream_id)
        self.streams[stream_id] = stream
        self.request_flush()
        return stream

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    # --- keepalive, goaway, close ----------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        now = self._loop.time()
        self._timer = self._loop.call_later(self._keepalive.next_check(now) + 0.01, self._tick)

    def _tick(self) -> None:
        action = self._keepalive.poll(self._loop.time())
        if action is KeepaliveAction.DEAD:
            self._fail(f"no answer from the server for {self._keepalive.timeout:g}s")
            return
        if action is KeepaliveAction.PING:
            self.session.send_ping(time.monotonic_ns().to_bytes(8, "big"))
            self.request_flush()
        self._arm_keepalive()

    def _retire(self) -> None:
        if not self.retired.done():
            self.retired.set_result(None)

    def mark_draining(self) -> None:
        """Take no new streams on this link (its slot starts a successor); close once idle."""
        self.draining = True
        self._retire()
        if not self.streams:
            self.close()

    def _goaway(self, event: GoAwayReceived) -> None:
        reason = event.message or event.code.name.lower()
        self.close_reason = f"server sent GOAWAY: {reason}"
        log(logger, logging.INFO, "link.goaway", server=self.name, reason=reason)
        self.mark_draining()

    def stream_finished(self) -> None:
        if self.draining and not self.streams:
            self.close()

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()


class LinkStream(PushStream):
    """A :class:`~fluidity.agent.streams.TunnelStream` carried by an :class:`AgentLink`.

    Received bytes are either buffered for :meth:`read` (at most the stream window) or, once
    :meth:`push_to` has set a consumer, handed to it as they arrive; the window is returned by
    :meth:`read` or by the consumer's :meth:`release`.
    """

    __slots__ = (
        "_buffer",
        "_consumer",
        "_eof",
        "_error",
        "_finished",
        "_local_ended",
        "_opened",
        "_read_waiter",
        "_writable_callback",
        "_write_waiter",
        "link",
        "stream_id",
    )

    def __init__(self, link: AgentLink, stream_id: int) -> None:
        self.link = link
        self.stream_id = stream_id
        # A list, not a deque: read() always takes everything, and an empty deque costs ~600 bytes
        # per stream (thousands of idle tunnels).
        self._buffer: list[memoryview] = []
        self._eof = False
        self._error: StreamOpenError | None = None
        self._opened = False
        self._local_ended = False
        self._finished = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._consumer: StreamConsumer | None = None
        self._writable_callback: Callable[[], None] | None = None

    @property
    def buffered(self) -> int:
        """Received bytes not yet read (at most the stream window)."""
        return sum(len(chunk) for chunk in self._buffer)

    # --- fed by the link -------------------------------------------------------------------------

    def feed(self, data: memoryview) -> None:
        if self._consumer is not None:
            self._consumer.stream_data(data)
            return
        self._buffer.append(data)
        self._wake_reader()

    def feed_eof(self) -> None:
        self._eof = True
        if self._consumer is not None:
            self._consumer.stream_eof()
        self._wake_reader()
        self._check_finished()

    def set_opened(self) -> None:
        self._opened = True
        if self._consumer is not None:
            self._consumer.stream_open()
        self._wake_reader()

    def set_error(self, error: StreamOpenError) -> None:
        self._error = error
        self._finished = True
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.stream_error(error)
        self._wake_reader()
        self.wake_writer()
        self.link.stream_finished()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._writable_callback is not None:
            self._writable_callback()

    # --- PushStream API --------------------------------------------------------------------------

    def push_to(self, consumer: StreamConsumer | None) -> None:
        self._consumer = consumer
        if consumer is None:
            return
        if self._opened:
            consumer.stream_open()
        if self._buffer:
            buffer = self._buffer
            data = buffer[0] if len(buffer) == 1 else memoryview(b"".join(buffer))
            buffer.clear()
            consumer.stream_data(data)
        if self._error is not None:
            self._consumer = None
            consumer.stream_error(self._error)
        elif self._eof:
            consumer.stream_eof()

    def release(self, n: int) -> None:
        link = self.link
        if link.session.consumed(self.stream_id, n):
            link.request_flush()  # a WINDOW frame is queued

    @property
    def write_blocked(self) -> bool:
        return self.link.session.pending_bytes(self.stream_id) > self.link.stream_buffer

    def on_writable(self, callback: Callable[[], None] | None) -> None:
        self._writable_callback = callback

    # --- TunnelStream API ------------------------------------------------------------------------

    async def wait_open(self) -> None:
        while not self._opened:
            if self._error is not None:
                raise self._error
            await self._wait_read()

    async def read(self) -> bytes:
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait_read()
        buffer = self._buffer
        data = bytes(buffer[0]) if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        link = self.link
        if link.session.consumed(self.stream_id, len(data)):
            link.request_flush()  # a WINDOW frame is queued (most reads queue none)
        return data

    async def _wait_read(self) -> None:
        self._read_waiter = self.link._loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    def write(self, data: bytes) -> None:
        if self._error is not None or self._local_ended:
            return
        self.link.session.send_data(self.stream_id, data)
        self.link.data_queued()

    async def drain(self) -> None:
        session = self.link.session
        while session.pending_bytes(self.stream_id) > self.link.stream_buffer:
            if self._error is not None:
                raise self._error
            self._write_waiter = self.link._loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        if self._local_ended or self._error is not None:
            return
        self._local_ended = True
        self.link.session.end_stream(self.stream_id)
        self.link.request_flush()
        self._check_finished()

    def close(self) -> None:
        if self._finished:
            return
        self._finished = True
        link = self.link
        if link.session.has_stream(self.stream_id) and not (self._eof and self._local_ended):
            link.session.reset_stream(self.stream_id, ErrorCode.CANCELLED)
            link.request_flush()
        link.forget(self.stream_id)
        link.stream_finished()

    def _check_finished(self) -> None:
        if self._eof and self._local_ended and not self._finished:
            self._finished = True
            self.link.forget(self.stream_id)
            self.link.stream_finished()
