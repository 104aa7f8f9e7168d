"""Raw bidirectional piping between a client socket and a tunnel stream, with half-close.

Used once a connection stops being HTTP: after ``CONNECT``, after a ``101 Switching Protocols``
(WebSocket), and by the SOCKS5 front end after its handshake.

Upstream (client -> stream) runs in the caller's task. Downstream (stream -> client) is pushed by
the stream's callbacks when the stream is a :class:`~fluidity.agent.streams.PushStream` (streams
of the tunnel are), so a tunnel holds one task; other streams get a second task that reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import cast

from fluidity.agent.streams import PushStream, StreamOpenError, TunnelStream

_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(slots=True)
class PipeResult:
    """Bytes carried in each direction, and whether both directions ended cleanly (EOF)."""

    sent: int = 0  # client -> stream
    received: int = 0  # stream -> client
    clean: bool = False


def reset_connection(transport: asyncio.BaseTransport) -> None:
    """Close a client connection with an RST rather than a FIN (a raw tunnel cut short)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger on, timeout 0: closing sends an RST (a plain abort sends a FIN).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]  # every stream transport has it


def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: TunnelStream,
    *,
    read_chunk: int = 256 * 1024,
    client_eof: bool = False,
) -> Coroutine[None, None, PipeResult]:
    """Carry bytes both ways until both directions have ended; await it for the byte counts.

    Half-close is honoured: the client's EOF becomes ``stream.write_eof()`` and the stream's EOF
    becomes ``writer.write_eof()``; the other direction keeps flowing until it ends too. An error
    in either direction (reset, lost link, broken client socket) stops both. Reads are at most
    ``read_chunk`` bytes and every write is followed by a drain, so memory stays bounded by
    ``read_chunk`` plus the two write buffers. ``client_eof`` says the client already sent EOF
    (bytes it sent before are the caller's to forward). Neither side is closed here: the caller
    owns both and closes them.
    """
    # A plain function that returns the coroutine doing the work: an open tunnel then holds
    # one coroutine frame less (about 450 bytes, which counts with thousands of them).
    if isinstance(stream, PushStream):
        return _pipe_pushed(reader, writer, stream, read_chunk, client_eof)
    return _pipe_tasks(reader, writer, stream, read_chunk, client_eof)


async def _pipe_tasks(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: TunnelStream,
    read_chunk: int,
    client_eof: bool,
) -> PipeResult:
    """:func:`pipe` for a stream that is read: downstream gets a task of its own."""
    result = PipeResult()

    async def downstream() -> None:
        while data := await stream.read():
            result.received += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def stop_upstream(task: asyncio.Task[None]) -> None:
        # A failed downstream ends the pipe: the upstream read wakes up with the same error.
        if not task.cancelled() and isinstance(exc := task.exception(), Exception):
            reader.set_exception(exc)

    # Upstream runs in the caller's task and only downstream gets a task of its own: an idle
    # tunnel then holds one extra task and no asyncio.wait bookkeeping (about 2 KB less per
    # tunnel, which counts with thousands of them open).
    down = asyncio.ensure_future(downstream())
    down.add_done_callback(stop_upstream)
    try:
        upstream_failed = not await _carry_upstream(reader, stream, result, read_chunk, client_eof)
        if upstream_failed:
            down.cancel()
        # asyncio.wait, unlike awaiting the task, neither raises its error nor cancels it if
        # this task is cancelled meanwhile (the finally clause does that).
        await asyncio.wait((down,))
    finally:
        if not down.done():
            down.cancel()
            await asyncio.wait((down,))
    if down.cancelled():
        return result
    error = down.exception()
    # A failed direction ends the pipe and the caller closes both ends either way, so I/O and
    # stream errors are expected here; anything else is a bug and is re-raised.
    if error is not None and not isinstance(error, OSError | StreamOpenError):
        raise error
    result.clean = not upstream_failed and error is None
    return result


async def _carry_upstream(
    reader: asyncio.StreamReader,
    stream: TunnelStream,
    result: PipeResult,
    read_chunk: int,
    client_eof: bool,
) -> bool:
    """Client -> stream until the client's EOF, then half-close the stream; False on an error."""
    try:
        if not client_eof:
            while data := await reader.read(read_chunk):
                result.sent += len(data)
                stream.write(data)
                await stream.drain()
        stream.write_eof()
    except (OSError, StreamOpenError):
        return False
    return True


async def _pipe_pushed(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: PushStream,
    read_chunk: int,
    client_eof: bool,
) -> PipeResult:
    """:func:`pipe` for a stream that pushes its bytes: one task per tunnel, not two."""
    result = PipeResult()
    down = _Downstream(reader, writer, stream, result)
    tunnel = cast(TunnelStream, stream)
    stream.push_to(down)
    try:
        upstream_failed = not await _carry_upstream(reader, tunnel, result, read_chunk, client_eof)
        if not upstream_failed:
            await down.finished()
    finally:
        down.stop()
    # As in the two-task pipe: a failed direction ends the pipe, and the caller closes both ends.
    result.clean = not upstream_failed and down.error is None
    return result


class _Downstream:
    """Writes what a :class:`PushStream` pushes to the client (the downstream half of a pipe).

    Backpressure: the stream's window is released as soon as bytes are handed to the client's
    transport, unless its buffer is over the high-water mark; then the bytes are held back and a
    short-lived task waits for the transport to drain before releasing them. The client buffer
    thus holds at most its high-water mark plus one stream window, as with a read-and-drain task.
    """

    __slots__ = (
        "_done",
        "_drain_task",
        "_reader",
        "_result",
        "_stream",
        "_waiter",
        "_withheld",
        "_writer",
        "error",
    )

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream: PushStream,
        result: PipeResult,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._stream = stream
        self._result = result
        self._done = False
        self._withheld = 0  # bytes written to the client whose window is not released yet
        self._drain_task: asyncio.Task[None] | None = None  # only while the client is slow
        self._waiter: asyncio.Future[None] | None = None  # only once upstream has ended
        self.error: Exception | None = None

    # --- StreamConsumer --------------------------------------------------------------------------

    def stream_open(self) -> None:
        pass  # pushing starts after the open result

    def stream_data(self, data: memoryview) -> None:
        if self._done:
            self._stream.release(len(data))
            return
        writer = self._writer
        transport = writer.transport
        if transport.is_closing():
            # What writer.drain() raises on a lost connection, in the two-task pipe.
            self._fail(ConnectionResetError("Connection lost"))
            self._stream.release(len(data))
            return
        n = len(data)
        self._result.received += n
        writer.write(data)
        if self._drain_task is not None:
            self._withheld += n
        elif transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self._withheld += n
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._stream.release(n)

    def stream_eof(self) -> None:
        if self._done:
            return
        writer = self._writer
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()
        self._finish()

    def stream_error(self, error: StreamOpenError) -> None:
        self._fail(error)

    # --- used by the pipe ------------------------------------------------------------------------

    async def finished(self) -> None:
        """Wait until the downstream direction has ended (EOF or error)."""
        if not self._done:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def stop(self) -> None:
        """Stop taking bytes from the stream (the pipe is over); idempotent."""
        self._stream.push_to(None)
        self._done = True
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None

    # --- internals -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            self._drain_task = None
            self._fail(exc)
            return
        self._drain_task = None
        withheld, self._withheld = self._withheld, 0
        self._stream.release(withheld)

    def _fail(self, error: Exception) -> None:
        if self._done:
            return
        self.error = error
        # The upstream read wakes up with the same error and ends the pipe.
        self._reader.set_exception(error)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
