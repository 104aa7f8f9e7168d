"""Fluidity only: many concurrent CONNECT tunnels held open, then all used at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.chains import Chain
from bench.measure import open_tunnel, read_small_response, small_request
from bench.procs import BenchError, peak_rss_bytes, rss_bytes
from bench.target import Target


@dataclass(frozen=True)
class ManyResult:
    wanted: int
    opened: int
    used: int  # tunnels that carried a GET /small and its whole answer after the hold
    open_seconds: float
    rss_held: int  # agent + server VmRSS at the end of the hold (bytes)
    rss_after: int  # agent + server VmRSS after every tunnel was used (bytes)
    peak_rss: int  # agent + server VmHWM at the end (bytes)


async def many_tunnels(
    chain: Chain,
    target: Target,
    *,
    count: int,
    hold: float,
    open_concurrency: int = 200,
    phase_timeout: float = 120.0,
) -> ManyResult:
    """Open ``count`` tunnels (``open_concurrency`` at a time), hold them ``hold`` s, use them all.

    Each phase is bounded by ``phase_timeout`` seconds; tunnels not done by then count as failed.
    """
    if chain.proxy_port is None:
        raise BenchError("the many-tunnels test needs a proxy chain")
    gate = asyncio.Semaphore(open_concurrency)
    tunnels: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one() -> None:
        async with gate:
            tunnels.append(await open_tunnel(chain, target))

    start = time.perf_counter()
    await _bounded([open_one() for _ in range(count)], phase_timeout)
    open_seconds = time.perf_counter() - start
    opened = len(tunnels)
    try:
        await asyncio.sleep(hold)
        rss_held = rss_bytes(chain.pids)
        request = small_request(target)

        async def use(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            writer.write(request)
            await read_small_response(reader, target)
            return True

        results = await _bounded([use(r, w) for r, w in tunnels], phase_timeout)
        used = sum(1 for result in results if result is True)
        return ManyResult(
            wanted=count,
            opened=opened,
            used=used,
            open_seconds=open_seconds,
            rss_held=rss_held,
            rss_after=rss_bytes(chain.pids),
            peak_rss=peak_rss_bytes(chain.pids),
        )
    finally:
        for _, writer in tunnels:
            writer.close()


async def _bounded(coros: list[object], timeout: float) -> list[object]:
    """Run the coroutines concurrently for at most ``timeout`` s; failures come back as values."""
    tasks = [asyncio.ensure_future(c) for c in coros]  # type: ignore[call-overload]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [
        t.result() if t in done and not t.cancelled() and t.exception() is None else None
        for t in tasks
    ]
