"""A fault-injecting TCP relay for tests: put it between the agent and the server.

``FaultRelay(target_port)`` listens on 127.0.0.1 (ephemeral port) and forwards every accepted
connection to ``127.0.0.1:target_port``. Faults, changeable at any time:

- ``latency``: seconds added to every chunk in each direction (one way), like ``netem delay``;
- ``rate``: bytes per second per direction per connection (``None``: unlimited), with a bounded
  relay queue (``queue_limit`` bytes per direction) so a saturated link builds a queue like a
  router's instead of buffering without bound;
- :meth:`black_hole`: the path stops carrying anything, with no FIN and no RST; connections made
  meanwhile are accepted and then hear nothing (a dead path after a NAT or firewall drops state);
  :meth:`restore` lets *new* connections through again (old ones stay frozen, as a real path
  whose peers gave up);
- :meth:`reset_all`: RST both sides of every open connection;
- :meth:`half_open`: close the server side of every connection (the server sees a FIN) while the
  agent side stays open and silent: the agent's view of a peer that vanished without its FIN
  arriving.

Counters: ``accepted`` (connections), ``bytes_up`` / ``bytes_down`` (agent→server, server→agent).
Only loopback is ever dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Self

HOST = "127.0.0.1"
CHUNK = 16 * 1024
RATE_SLACK = 0.005  # seconds a rate-capped direction may catch up by after sleeping long


class _Direction:
    """One direction of one connection: a bounded, delayed, rate-limited queue."""

    def __init__(self, relay: FaultRelay, up: bool) -> None:
        self.relay = relay
        self.up = up
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.changed = asyncio.Event()
        self.line_free_at = 0.0  # loop time at which the rate cap has sent all it was given


class _Pair:
    def __init__(
        self,
        relay: FaultRelay,
        down_reader: asyncio.StreamReader,
        down_writer: asyncio.StreamWriter,
    ) -> None:
        self.relay = relay
        self.down_reader = down_reader
        self.down_writer = down_writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.frozen = relay._black_hole
        self.half_open = False
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        relay = self.relay
        try:
            self.up_reader, self.up_writer = await asyncio.open_connection(HOST, relay.target_port)
        except OSError:
            self.down_writer.transport.abort()
            return
        up = _Direction(relay, up=True)
        down = _Direction(relay, up=False)
        self.tasks = [
            asyncio.ensure_future(self._read(self.down_reader, up)),
            asyncio.ensure_future(self._write(up, self.up_writer, self.down_writer)),
            asyncio.ensure_future(self._read(self.up_reader, down)),
            asyncio.ensure_future(self._write(down, self.down_writer, self.up_writer)),
        ]
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader, direction: _Direction) -> None:
        relay = self.relay
        loop = asyncio.get_running_loop()
        while True:
            while self.frozen or direction.queued >= relay.queue_bound():
                # A frozen path neither reads nor acknowledges: the sender's buffers fill up.
                direction.changed.clear()
                await direction.changed.wait()
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = b""
            if self.frozen or self.half_open:
                if not data:
                    return  # the end is lost too: the other side is never told
                continue  # the bytes are lost
            direction.queue.append((loop.time() + relay.latency, data or None))
            direction.queued += len(data)
            direction.changed.set()
            if not data:
                return

    async def _write(
        self, direction: _Direction, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        relay = self.relay
        loop = asyncio.get_running_loop()
        while True:
            while not direction.queue or self.frozen:
                direction.changed.clear()
                await direction.changed.wait()
            due, data = direction.queue[0]
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            direction.queue.popleft()
            if data is None:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            direction.queued -= len(data)
            direction.changed.set()
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                other.transport.abort()
                return
            if direction.up:
                relay.bytes_up += len(data)
            else:
                relay.bytes_down += len(data)
            if relay.rate:
                # Pace against a running schedule, not chunk by chunk: event loops round short
                # timers to whole milliseconds, so a sleep per 16 KiB chunk caps a fast line
                # far below its rate. A line behind its schedule by up to RATE_SLACK seconds
                # catches up (a token bucket that small); one idle longer does not burst.
                now = loop.time()
                start = max(now - RATE_SLACK, direction.line_free_at)
                direction.line_free_at = start + len(data) / relay.rate
                if (wait := direction.line_free_at - now) > 0:
                    await asyncio.sleep(wait)

    def reset(self) -> None:
        for writer in (self.down_writer, self.up_writer):
            if writer is not None:
                _abort_with_rst(writer)
        for task in self.tasks:
            task.cancel()

    def close_server_side(self) -> None:
        self.half_open = True
        if self.up_writer is not None:
            self.up_writer.close()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # SO_LINGER with a zero timeout turns close() into an RST.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    writer.transport.abort()


class FaultRelay:
    """See the module docstring. Use as ``async with FaultRelay(port) as relay: relay.port``."""

    def __init__(
        self,
        target_port: int,
        *,
        latency: float = 0.0,
        rate: float | None = None,
        queue_limit: int = 64 * 1024,
    ) -> None:
        self.target_port = target_port
        self.latency = latency
        self.rate = rate
        self.queue_limit = queue_limit
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        #: Bytes the delay line may hold when there is no rate cap (bounds memory at 0 latency).
        self.delay_line_limit = 8 * 1024 * 1024
        self.pairs: list[_Pair] = []
        self._black_hole = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in self.pairs:
            pair.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pair = _Pair(self, reader, writer)
        self.pairs.append(pair)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await pair.run()
        finally:
            self._tasks.discard(task)
            if pair in self.pairs:
                self.pairs.remove(pair)

    def queue_bound(self) -> int:
        """Bytes one direction may hold: the bottleneck queue plus what the delay line carries."""
        if self.rate:
            return self.queue_limit + int(self.rate * self.latency)
        return self.queue_limit + (self.delay_line_limit if self.latency else 0)

    # --- faults ----------------------------------------------------------------------------

    def black_hole(self) -> None:
        """From now on nothing crosses, on open and new connections alike; nobody is told."""
        self._black_hole = True
        for pair in self.pairs:
            pair.frozen = True

    def restore(self) -> None:
        """New connections pass again; connections frozen by :meth:`black_hole` stay frozen."""
        self._black_hole = False

    def reset_all(self) -> None:
        """Abort every open connection with an RST on both sides."""
        for pair in list(self.pairs):
            pair.reset()

    def half_open(self) -> None:
        """Close the server side of every open connection; the agent side hears nothing."""
        for pair in list(self.pairs):
            pair.close_server_side()
