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

    async def upstream() -> None:
        if not client_eof:
            while data := await reader.read(read_chunk):
                result.sent += len(data)
                stream.write(data)
                await stream.drain()
        stream.write_eof()

    async def downstream() -> None:
        while data := await stream.read():
            result.received += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = (asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream()))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = any(t.exception() is not None for t in done)
        result.clean = not failed and len(done) == 2
    finally:
        for task in tasks:
            task.cancel()
        # A failed direction ends the pipe and the caller closes both ends either way, so I/O
        # and stream errors are expected here; anything else is a bug and is re-raised.
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception) and not isinstance(
                outcome, OSError | StreamOpenError
            ):
                raise outcome
    return result
