"""How an accepted client connection reaches its handler: by its first bytes.

Every listening port of the agent gives a new connection a tiny protocol (:class:`FirstRead`)
that waits for the first bytes. Those bytes are offered to a "serve now" function, which may make
the connection task-less (a CONNECT tunnel, a keep-alive request relay) by giving its transport a
protocol of its own; otherwise :func:`start_stream_handler` builds the usual asyncio stream reader
and writer, moves the transport to them (``set_protocol``), feeds them those bytes and starts the
handler's task, exactly as ``asyncio.start_server`` would have done on accept. A task-less
connection that meets a request it does not serve hands the connection over the same way.

The client's address is kept in a context variable of the connection's task, so the status page
(loopback only unless configured) and authentication logs can see who is asking.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

#: The address of the client whose connection the current task serves (``""`` outside one).
client_address: contextvars.ContextVar[str] = contextvars.ContextVar("fluidity_client", default="")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
#: Takes a connection from its first bytes without a task; False leaves it untouched.
ServeNow = Callable[[asyncio.Transport, bytes], bool]


class TaskLessConnection(Protocol):
    """A client connection served by its transport's callbacks (a tunnel, a relay)."""

    def abort(self) -> None:
        """Cut the connection now; its ``connection_lost`` reports it gone."""


_C = TypeVar("_C", bound=TaskLessConnection)


class TaskLessConnections(Generic[_C]):
    """The open task-less connections of a front end, and a wait for the last one to end.

    There is no task to cancel or await for them: shutdown aborts them and waits here.
    """

    def __init__(self) -> None:
        self._open: set[_C] = set()
        self._all_gone: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, connection: object) -> bool:
        return connection in self._open

    def __iter__(self) -> Iterator[_C]:
        return iter(list(self._open))

    def add(self, connection: _C) -> None:
        self._open.add(connection)

    def discard(self, connection: _C) -> bool:
        """Forget ``connection``; True if it was open."""
        if connection not in self._open:
            return False
        self._open.discard(connection)
        waiter = self._all_gone
        if not self._open and waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def abort_all(self) -> None:
        for connection in list(self._open):
            connection.abort()

    async def wait_closed(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: no limit) until none is open; True if so."""
        if not self._open:
            return True
        if self._all_gone is None or self._all_gone.done():
            self._all_gone = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait((self._all_gone,), timeout=timeout)
        return bool(done)


def current_client() -> str:
    """The address of the client whose connection is being served (``""`` outside one)."""
    return client_address.get()


def start_stream_handler(
    transport: asyncio.Transport,
    handler: StreamHandler,
    limit: int,
    data: bytes,
    *,
    eof: bool = False,
) -> None:
    """Serve ``transport`` with ``handler`` (a stream handler, as for ``asyncio.start_server``),
    ``data`` being the bytes already received from it and ``eof`` whether the client has ended
    its side. ``limit`` (bytes) is the stream reader's buffer limit. Reading must not be paused.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, handler, loop=loop)
    transport.set_protocol(protocol)
    # The handler's task copies the context it is created in, so the client's address is set
    # in a fresh copy around connection_made (which creates the writer and starts the task):
    # no wrapper coroutine per connection (about 450 bytes per open tunnel).
    context = contextvars.copy_context()
    context.run(client_address.set, peer_host(transport.get_extra_info("peername")))
    context.run(protocol.connection_made, transport)
    if data:
        protocol.data_received(data)
    if eof:
        protocol.eof_received()


class FirstRead(asyncio.Protocol):
    """Waits for a connection's first bytes, then hands it to the handler chosen from them.

    ``serve_now`` is offered the bytes first; when it declines, ``choose`` picks a stream
    handler and its reader limit. A connection silent for ``timeout`` seconds, or closed before
    sending anything, is closed without an answer.
    """

    def __init__(
        self,
        choose: Callable[[bytes], tuple[StreamHandler, int]],
        timeout: float,
        serve_now: ServeNow | None = None,
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
        self._transport = None  # handed over: later callbacks go to the new protocol
        if self._timer is not None:
            self._timer.cancel()
        if self._serve_now is not None and self._serve_now(transport, data):
            return  # the transport has a new protocol
        handler, limit = self._choose(data)
        start_stream_handler(transport, handler, limit, data)

    def eof_received(self) -> bool:
        return False  # nothing was sent: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


def peer_host(peername: object) -> str:
    """The host part of a socket's ``peername`` (``""`` when there is none)."""
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""
