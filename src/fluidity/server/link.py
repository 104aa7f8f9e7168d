"""One agent link on the server: the asyncio shell around a :class:`~fluidity.wire.Session`.

Bytes from the TLS transport go into the session; its events open target connections (through
the egress policy and dialer) and move bytes to them. Bytes read from targets go back into the
session, which frames and schedules them fairly. Nothing here parses HTTP: the server is a dialer.

Backpressure, both ways:

- link → target: credit for a stream is returned only once its bytes are written to a target
  socket that is not paused, so a slow target holds at most ``stream_window`` bytes here;
- target → link: a target socket stops being read while its stream has ``stream_buffer`` bytes
  queued in the session (credit exhausted or the TLS transport paused).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, cast

from fluidity.link_protocol import LinkProtocol
from fluidity.logs import log
from fluidity.server.dialer import DialError, DialFailure, dial
from fluidity.server.egress import IPAddress
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
    StreamEnded,
    StreamOpenRequested,
    StreamReset,
)

if TYPE_CHECKING:
    from fluidity.server.listener import Server

logger = logging.getLogger("fluidity.server")

_DIAL_CODES = {
    DialFailure.DNS: ErrorCode.DNS_FAILURE,
    DialFailure.REFUSED: ErrorCode.REFUSED,
    DialFailure.TIMEOUT: ErrorCode.TIMEOUT,
    DialFailure.DENIED: ErrorCode.DENIED,
    DialFailure.UNREACHABLE: ErrorCode.UNREACHABLE,
    DialFailure.ERROR: ErrorCode.INTERNAL,
}


class ServerLink(LinkProtocol):
    """The protocol object of one authenticated agent link."""

    def __init__(self, server: Server, peer: str, identity: str) -> None:
        self.server = server
        self.peer = peer
        self.identity = identity
        config = server.config
        super().__init__(Session(Role.SERVER, server.session_settings, clock=time.monotonic))
        self.targets: dict[int, Target] = {}
        self.closed = self._loop.create_future()
        self._keepalive = Keepalive(
            config.keepalive_interval, config.keepalive_timeout, self._loop.time()
        )
        self._timer: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self.stream_buffer = config.stream_buffer

    # --- transport callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls_transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        if not self.server.admit(self, tls_transport):
            self.session.failed = True  # refused: ignore whatever the agent sends meanwhile
            return
        self.transport = tls_transport
        self._arm_keepalive()
        self._hello_timer = self._loop.call_later(
            self.server.config.handshake_timeout, self._hello_overdue
        )
        self.flush()

    def _hello_overdue(self) -> None:
        """An authenticated peer that never says HELLO must not hold a link slot."""
        if not self.session.peer_ready and self.transport is not None:
            log(logger, logging.WARNING, "link.protocol_error", peer=self.peer,
                agent=self.identity,
                reason=f"no HELLO within {self.server.config.handshake_timeout:g}s")  # fmt: skip
            self.transport.abort()

    def buffer_updated(self, nbytes: int) -> None:
        if self.transport is None:
            return
        self._keepalive.received(self._loop.time())
        try:
            events = self.session.receive_buffered(nbytes)
        except ProtocolError as exc:
            log(logger, logging.WARNING, "link.protocol_error", peer=self.peer,
                agent=self.identity, reason=str(exc))  # fmt: skip
            self.flush()
            self.abort_all(ErrorCode.PROTOCOL_ERROR)
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if type(event) is DataReceived:
                target = self.targets.get(event.stream_id)
                if target is not None:
                    target.send(event.data)
                else:
                    self.session.consumed(event.stream_id, len(event.data))
            elif type(event) is StreamOpenRequested:
                self._open(event)
            elif type(event) is StreamEnded:
                target = self.targets.get(event.stream_id)
                if target is not None:
                    target.peer_ended()
            elif type(event) is StreamReset:
                target = self.targets.pop(event.stream_id, None)
                if target is not None:
                    target.abort()
            elif type(event) is GoAwayReceived:
                log(logger, logging.INFO, "link.goaway_received", peer=self.peer,
                    agent=self.identity, reason=event.message or event.code.name)  # fmt: skip
            elif type(event) is LinkReady or type(event) is PongReceived:
                pass
        if self.session.has_data_to_send():  # credit, answers; most reads queue nothing
            self.request_flush()

    def eof_received(self) -> bool:
        return False  # the agent closed its side: close the link

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.abort_all(ErrorCode.CONNECTION_LOST)
        self.server.link_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- sending (LinkProtocol) ----------------------------------------------------------------

    def stream_drained(self, stream_id: int) -> None:
        target = self.targets.get(stream_id)
        if target is not None:
            target.resume_reading()

    # --- streams ---------------------------------------------------------------------------------

    def _open(self, event: StreamOpenRequested) -> None:
        target = Target(self, event.stream_id, f"{event.host}:{event.port}")
        self.targets[event.stream_id] = target
        self.server.stats.stream_opened()
        target.dial_task = self._loop.create_task(self._dial(target, event.host, event.port))

    async def _dial(self, target: Target, host: str, port: int) -> None:
        config = self.server.config
        loop = self._loop

        async def connect(address: IPAddress, port: int) -> object:
            # The loop makes socket, connection and transport in one call (uvloop: in C, with
            # TCP_NODELAY set); a socket from connect_tcp wrapped afterwards costs twice the CPU.
            return await loop.create_connection(lambda: target, str(address), port)

        try:
            policy = self.server.policy
            await dial(host, port, policy=policy, timeout=config.dial_timeout, connector=connect)
        except DialError as exc:
            self._refuse(target, _DIAL_CODES[exc.failure], exc.failure.value, exc.message)
        except OSError as exc:
            self._refuse(target, ErrorCode.INTERNAL, "error", os.strerror(exc.errno or 0))
        else:
            # Dialled: nothing left to cancel, and a finished task kept for the stream's whole
            # life costs about 1 KB per open stream.
            target.dial_task = None
            if self.targets.get(target.stream_id) is target:
                self.session.accept_stream(target.stream_id)
                self.request_flush()
            elif target.transport is not None:
                target.transport.abort()  # the agent gave up while we dialled

    def _refuse(self, target: Target, code: ErrorCode, reason: str, message: str) -> None:
        if code is ErrorCode.INTERNAL:
            # A local failure (e.g. out of file descriptors), not the target's doing: say which.
            log(logger, logging.WARNING, "stream.open_failed", agent=self.identity,
                target=target.name, reason=reason, detail=message)  # fmt: skip
        else:
            log(logger, logging.INFO, "stream.open_failed", agent=self.identity,
                target=target.name, reason=reason)  # fmt: skip
        log(logger, logging.DEBUG, "stream.open_failed.detail", target=target.name, detail=message)
        if self.targets.pop(target.stream_id, None) is not None:
            self.server.stats.stream_closed()
            self.session.reject_stream(target.stream_id, code, message)
            self.request_flush()
            self._close_if_drained()

    def target_done(self, target: Target) -> None:
        if self.targets.get(target.stream_id) is target:
            del self.targets[target.stream_id]
        self.server.stats.stream_closed()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.session.goaway_sent and not self.targets and self.transport is not None:
            self.flush()
            self.transport.close()

    def abort_all(self, code: ErrorCode) -> None:
        for target in list(self.targets.values()):
            target.abort()
        self.targets.clear()

    # --- keepalive and shutdown ------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        now = self._loop.time()
        self._timer = self._loop.call_later(self._keepalive.next_check(now) + 0.01, self._tick)

    def _tick(self) -> None:
        action = self._keepalive.poll(self._loop.time())
        if action is KeepaliveAction.DEAD:
            log(logger, logging.WARNING, "link.dead", peer=self.peer, agent=self.identity,
                reason=f"nothing received for {self._keepalive.timeout:g}s")  # fmt: skip
            if self.transport is not None:
                self.transport.abort()
            return
        if action is KeepaliveAction.PING:
            self.session.send_ping(time.monotonic_ns().to_bytes(8, "big"))
            self.request_flush()
        self._arm_keepalive()

    def goaway(self, message: str) -> None:
        """Accept no new streams; close the link once the open ones have finished."""
        self.session.send_goaway(ErrorCode.GOING_AWAY, message)
        self.request_flush()
        self._close_if_drained()

    def close(self) -> None:
        self.abort_all(ErrorCode.GOING_AWAY)
        if self.transport is not None:
            self.flush()
            self.transport.close()


class Target(asyncio.Protocol):
    """The TCP connection to one stream's target.

    A slots object with no per-stream containers until needed: thousands of these sit idle at
    once, and each ``__dict__`` or empty list costs more than the fields themselves.
    """

    __slots__ = (
        "_done",
        "_early",
        "_eof_sent_to_peer",
        "_peer_ended",
        "_read_paused",
        "_withheld",
        "_write_paused",
        "dial_task",
        "link",
        "name",
        "session",
        "stream_id",
        "transport",
    )

    def __init__(self, link: ServerLink, stream_id: int, name: str) -> None:
        self.link = link
        self.session = link.session
        self.stream_id = stream_id
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.dial_task: asyncio.Task[None] | None = None
        # Bytes the agent sent before the dial completed (at most the stream window); created
        # only when such bytes arrive.
        self._early: list[memoryview] | None = None
        self._peer_ended = False
        self._eof_sent_to_peer = False
        self._write_paused = False
        self._read_paused = False
        self._withheld = 0  # credit held back while the target is not draining
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        early, self._early = self._early, None
        if early is not None:
            for chunk in early:
                self.send(chunk)
        if self._peer_ended:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.send_data(self.stream_id, data)
        self.link.data_queued()
        if (
            session.pending_bytes(self.stream_id) >= self.link.stream_buffer
            and not self._read_paused
        ):
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof_sent_to_peer = True
        self.session.end_stream(self.stream_id)
        self.link.request_flush()
        # Keep our sending direction open (half-close) unless the agent has finished too.
        return not self._peer_ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        if exc is not None:
            self.session.reset_stream(self.stream_id, ErrorCode.CONNECTION_LOST, str(exc))
        elif not self._eof_sent_to_peer:
            self.session.end_stream(self.stream_id)
        self.link.request_flush()
        self.link.target_done(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._withheld:
            self.session.consumed(self.stream_id, self._withheld)
            self._withheld = 0
            self.link.request_flush()

    # --- called by the link ----------------------------------------------------------------------

    def send(self, data: memoryview) -> None:
        transport = self.transport
        if transport is None:
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        if transport.is_closing():
            self.session.consumed(self.stream_id, len(data))
            return
        transport.write(data)
        if self._write_paused:
            self._withheld += len(data)
        else:
            self.session.consumed(self.stream_id, len(data))

    def peer_ended(self) -> None:
        self._peer_ended = True
        if self.transport is not None:
            self._write_eof()

    def _write_eof(self) -> None:
        assert self.transport is not None
        if self._eof_sent_to_peer:
            self.transport.close()  # both directions are finished
        elif self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.dial_task is not None and not self.dial_task.done():
            self.dial_task.cancel()
        if self.transport is not None:
            self.transport.abort()
        elif not self._done:
            self._done = True
            self.link.server.stats.stream_closed()
