"""The raw pipe over tunnel streams: bytes are pushed to the client without a reader task, and a
client that stops reading holds the tunnel back instead of growing memory."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from fluidity.agent.pipe import PipeResult, pipe
from fluidity.agent.streams import TunnelStream
from fluidity.agent.tunnel import Tunnel
from fluidity.certs import PkiPaths

from .stack import (
    echo_handler,
    expected_source_digest,
    running_server,
    running_tunnel,
    source_handler,
    tcp_server,
)

MiB = 1024 * 1024
WINDOW = 64 * 1024
HIGH_WATER = 64 * 1024


def piping_handler(
    tunnel: Tunnel,
    target_port: int,
    results: list[PipeResult],
    writers: list[asyncio.StreamWriter] | None = None,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A local front end: each client is piped to ``127.0.0.1:target_port`` through ``tunnel``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)
        if writers is not None:
            writers.append(writer)
        stream: TunnelStream = await tunnel.open("127.0.0.1", target_port)
        try:
            await stream.wait_open()
            results.append(await pipe(reader, writer, stream))
        finally:
            stream.close()
            writer.close()

    return handle


async def test_piped_tunnel_echoes_with_half_close_and_no_extra_task(pki: PkiPaths) -> None:
    payload = hashlib.sha256(b"push").digest() * (MiB // 32)
    results: list[PipeResult] = []
    tasks: list[int] = []
    async with (
        running_server(pki) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as echo_port,
        tcp_server(piping_handler(tunnel, echo_port, results)) as front_port,
    ):
        baseline = len(asyncio.all_tasks())
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        writer.write(payload[:32])
        assert await reader.readexactly(32) == payload[:32]  # the pipe is running now
        tasks.append(len(asyncio.all_tasks()))
        writer.write(payload[32:])
        writer.write_eof()
        echoed = await reader.read(-1)  # until the tunnel's EOF comes back
        writer.close()
        while not results:
            await asyncio.sleep(0.01)
    assert payload[:32] + echoed == payload
    assert results[0].clean
    assert (results[0].sent, results[0].received) == (len(payload), len(payload))
    # The open tunnel holds two tasks here: the front end's connection handler (running the
    # pipe) and the echo origin's handler. The stream -> client direction has none of its own.
    assert tasks[0] - baseline == 2


async def test_client_that_stops_reading_holds_the_stream_within_its_window(
    pki: PkiPaths,
) -> None:
    size = 16 * MiB
    results: list[PipeResult] = []
    writers: list[asyncio.StreamWriter] = []
    async with (
        running_server(pki, stream_window=WINDOW) as server,
        running_tunnel(pki, server.port, stream_window=WINDOW) as tunnel,
        tcp_server(source_handler(size)) as source_port,
        tcp_server(piping_handler(tunnel, source_port, results, writers)) as front_port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        writer.transport.pause_reading()  # the client reads nothing for a while
        await asyncio.sleep(0.5)
        link = tunnel.links[0]
        (stream,) = link.streams.values()
        # The agent holds at most the client's high-water mark plus one window for this
        # client (the rest waits in kernel buffers and at the source), none of it in the stream.
        assert 0 < writers[0].transport.get_write_buffer_size() <= HIGH_WATER + WINDOW
        assert stream.buffered == 0
        assert link.session.bytes_received < size
        writer.transport.resume_reading()
        digest = hashlib.sha256()
        received = 0
        while chunk := await reader.read(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
        writer.close()
    assert received == size
    assert digest.hexdigest() == expected_source_digest(size)
