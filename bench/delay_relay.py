"""``python -m bench.delay_relay``: a TCP relay on loopback that makes one hop a long path.

Each byte is delivered ``--delay`` seconds after it was read, in each direction, and at most
``--window`` bytes per direction are between being read and being "acknowledged" (``--delay``
after their delivery, the trip the ACK would take). So a chain that crosses the relay sees a round
trip of twice the delay, and any TCP connection over it at most ``window`` bytes per round trip:
the limit TCP's receive-window auto-tuning reaches on a real path (``net.ipv4.tcp_rmem``'s
maximum, 6 MiB by default), which a relay otherwise hides (its own loopback sockets ack at once).

With ``--rate``, each direction is also a bottleneck of that many bytes per second, shared by
every connection across the relay (a user's access line): bytes leave it in the order they
arrived, one after the other, and wait in its queue meanwhile. The queue has no limit, as in a
"bufferbloated" home router: a sender that keeps more in flight than the path's
bandwidth-delay product makes everything behind it wait longer.

Limits of the model: no loss, no slow start, no queue limit; without ``--rate`` no bandwidth cap
(the CPU is the cap). Linux ``tc netem`` would be the real thing, but this machine's kernel has
no netem qdisc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections import deque
from pathlib import Path

READ_SIZE = 256 * 1024
BOTTLENECK_CHUNK = 16 * 1024
"""Bytes read at a time through a ``--rate`` bottleneck: a small answer waits behind at most
one such chunk of another connection's, not a whole :data:`READ_SIZE` (as behind packets)."""


def tcp_window_cap() -> int:
    """Bytes: the most a Linux TCP receive window grows to here (``tcp_rmem``'s maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 * 1024 * 1024


class Bottleneck:
    """One direction of a line of ``rate`` bytes/s: when the bytes handed to it now leave it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = 0.0  # loop time at which the line has sent all it was handed

    def departure(self, now: float, nbytes: int) -> float:
        """Loop time at which ``nbytes`` handed over at ``now`` have left (queue + sending)."""
        self._free_at = max(now, self._free_at) + nbytes / self.rate
        return self._free_at


class _Direction:
    """Bytes read from one socket, held back ``delay`` seconds, written to the other."""

    def __init__(self, delay: float, window: int, line: Bottleneck | None = None) -> None:
        self.delay = delay
        self.window = window
        self.line = line
        self.queue: deque[tuple[float, bytes]] = deque()  # (due time, bytes); b"" = EOF
        self.unacked = 0
        self.space = asyncio.Event()
        self.arrived = asyncio.Event()

    def release(self, nbytes: int) -> None:
        self.unacked -= nbytes
        if self.unacked < self.window:
            self.space.set()

    async def read_side(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.unacked >= self.window:
                self.space.clear()
                await self.space.wait()
            chunk = READ_SIZE if self.line is None else BOTTLENECK_CHUNK
            data = await reader.read(min(chunk, self.window - self.unacked))
            now = loop.time()
            sent = now if self.line is None or not data else self.line.departure(now, len(data))
            self.queue.append((sent + self.delay, data))
            self.arrived.set()
            if not data:
                return
            self.unacked += len(data)

    async def write_side(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.queue[0]
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            loop.call_later(self.delay, self.release, len(data))


async def _serve(listen: int, to: int, delay: float, window: int, rate: float) -> None:
    uplink = Bottleneck(rate) if rate > 0 else None
    downlink = Bottleneck(rate) if rate > 0 else None

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", to)
        except OSError:
            client_w.close()
            return
        up, down = _Direction(delay, window, uplink), _Direction(delay, window, downlink)
        tasks = [
            asyncio.create_task(up.read_side(client_r)),
            asyncio.create_task(up.write_side(server_w)),
            asyncio.create_task(down.read_side(server_r)),
            asyncio.create_task(down.write_side(client_w)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            client_w.close()
            server_w.close()

    server = await asyncio.start_server(relay, "127.0.0.1", listen, limit=READ_SIZE)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delay_relay", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--to", type=int, required=True, help="port on 127.0.0.1 to relay to")
    parser.add_argument("--delay", type=float, required=True, help="seconds, each way")
    parser.add_argument("--window", type=int, default=tcp_window_cap(), help="bytes in flight")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="bottleneck, bytes/s each way (0 = none)"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        pass  # the standard loop: slower, the same delays
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.listen, args.to, args.delay, args.window, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
