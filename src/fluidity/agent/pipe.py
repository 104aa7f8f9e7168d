"""Raw bidirectional piping between a client socket and a tunnel stream, with half-close.

Used once a connection stops being HTTP: after ``CONNECT``, after a ``101 Switching Protocols``
(WebSocket), and by the SOCKS5 front end after its handshake.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fluidity.agent.streams import StreamOpenError, TunnelStream


@dataclass(slots=True)
class PipeResult:
    """Bytes carried in each direction, and whether both directions ended cleanly (EOF)."""

    sent: int = 0  # client -> stream
    received: int = 0  # stream -> client
    clean: bool = False


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: TunnelStream,
    *,
    read_chunk: int = 256 * 1024,
    client_eof: bool = False,
) -> PipeResult:
    """Carry bytes both ways until both directions have ended; return the byte counts.

    Half-close is honoured: the client's EOF becomes ``stream.write_eof()`` and the stream's EOF
    becomes ``writer.write_eof()``; the other direction keeps flowing until it ends too. An error
    in either direction (reset, lost link, broken client socket) stops both. Reads are at most
    ``read_chunk`` bytes and every write is followed by a drain, so memory stays bounded by
    ``read_chunk`` plus the two write buffers. ``client_eof`` says the client already sent EOF
    (bytes it sent before are the caller's to forward). Neither side is closed here: the caller
    owns both and closes them.
    """
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
    upstream_failed = False
    try:
        try:
            if not client_eof:
                while data := await reader.read(read_chunk):
                    result.sent += len(data)
                    stream.write(data)
                    await stream.drain()
            stream.write_eof()
        except (OSError, StreamOpenError):
            upstream_failed = True
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
