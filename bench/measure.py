"""The loads: curl bulk downloads, wrk request rates and latencies, an asyncio tunnel client.

Every load is bounded in time (curl ``--max-time``, wrk ``-d`` and ``--timeout``, asyncio
timeouts). Units: MB = 10**6 bytes, GB = 10**9 bytes, latencies in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h11

from bench.chains import Chain
from bench.procs import BenchError
from bench.target import Target

LUA_SCRIPT = Path(__file__).with_name("proxy.lua")


# --- curl: bulk downloads -----------------------------------------------------------------------


def curl_download(
    target: Target, path: str, chain: Chain, *, tunnel: bool, max_time: float, output: str
) -> tuple[int, float]:
    """Download ``path`` with curl through ``chain`` (CONNECT if ``tunnel``); return bytes, s.

    ``output`` is where the body goes (``/dev/null`` for timing runs). Raises if the status is
    not 200 or the size is not the object's.
    """
    argv = ["curl", "-sS", "--max-time", f"{max_time:g}", "-o", output]
    argv += ["-w", "%{http_code} %{size_download} %{time_total}"]
    if chain.proxy_port is not None:
        argv += ["-x", f"http://127.0.0.1:{chain.proxy_port}"]
        if tunnel:
            argv.append("-p")
    argv.append(target.url(path))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, env=env, timeout=max_time + 10
    )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 3 or fields[0] != "200":
        raise BenchError(
            f"curl {path} via {chain.name} ({'CONNECT' if tunnel else 'plain'}) failed: "
            f"exit {done.returncode}, {done.stdout!r} {done.stderr.strip()!r}"
        )
    size, seconds = int(fields[1]), float(fields[2])
    if size != target.sizes[path]:
        raise BenchError(
            f"curl {path} via {chain.name}: {size} bytes, expected {target.sizes[path]}"
        )
    return size, seconds


# --- wrk: request rate and latency --------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # connect, read, write, timeout errors and non-2xx/3xx answers

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(target: Target, chain: Chain, *, connections: int, seconds: float) -> WrkResult:
    """Run wrk (one thread) with keep-alive GETs of ``/small`` for ``seconds`` (whole, ≥ 1)."""
    if chain.proxy_port is None:
        url, path = target.url("/"), "/small"
    else:
        url, path = f"http://127.0.0.1:{chain.proxy_port}/", target.url("/small")
    env = dict(os.environ, BENCH_URL=path, BENCH_HOST=target.authority)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    argv += ["-s", str(LUA_SCRIPT), url]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, env=env, timeout=seconds + 30
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk via {chain.name} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(line[len("BENCH ") :])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
    )


# --- asyncio client: new tunnels per second, time to first byte ----------------------------------


def connect_request(target: Target) -> bytes:
    return f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n".encode()


def small_request(target: Target) -> bytes:
    return f"GET /small HTTP/1.1\r\nHost: {target.authority}\r\n\r\n".encode()


async def open_tunnel(
    chain: Chain, target: Target
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the target: through a CONNECT tunnel, or straight for ``direct``."""
    port = chain.proxy_port if chain.proxy_port is not None else target.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if chain.proxy_port is not None:
        writer.write(connect_request(target))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            writer.close()
            raise BenchError(f"CONNECT via {chain.name} answered {head[:60]!r}")
    return reader, writer


async def read_small_response(reader: asyncio.StreamReader, target: Target) -> None:
    """Read one ``/small`` response (nginx sends Content-Length) and check its size."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"unexpected answer through the tunnel: {head[:60]!r}")
    await reader.readexactly(target.sizes["/small"])


async def _one_tunnel(chain: Chain, target: Target) -> float:
    """Open a tunnel, GET /small through it, close; return the time to the response's 1st byte."""
    start = time.perf_counter()
    reader, writer = await open_tunnel(chain, target)
    try:
        writer.write(small_request(target))
        await reader.readexactly(1)
        first = time.perf_counter() - start
        rest = await reader.readuntil(b"\r\n\r\n")
        if not rest.startswith(b"TTP/1.1 200"):
            raise BenchError(f"unexpected answer via {chain.name}: {rest[:60]!r}")
        await reader.readexactly(target.sizes["/small"])
    finally:
        writer.close()
    return first


@dataclass(frozen=True)
class TunnelResult:
    rate: float  # tunnels opened, used and closed per second at the given concurrency
    ttfb_p50_ms: float  # at concurrency 1
    failures: int


async def tunnels(
    chain: Chain, target: Target, *, concurrency: int, seconds: float, ttfb_samples: int
) -> TunnelResult:
    """Time to first byte at concurrency 1, then tunnels/s with ``concurrency`` workers."""
    samples = []
    deadline = time.perf_counter() + seconds
    failures = 0
    for _ in range(ttfb_samples):
        if time.perf_counter() > deadline:
            break
        async with asyncio.timeout(5):
            samples.append(await _one_tunnel(chain, target))
    done = 0

    async def worker(stop: float) -> None:
        nonlocal done, failures
        while time.perf_counter() < stop:
            try:
                async with asyncio.timeout(5):
                    await _one_tunnel(chain, target)
                done += 1
            except (OSError, BenchError, TimeoutError, asyncio.IncompleteReadError):
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return TunnelResult(done / elapsed, statistics.median(samples) * 1000, failures)


# --- correctness: whole bodies through a chain ---------------------------------------------------


async def fetch(chain: Chain, target: Target, path: str, *, tunnel: bool) -> bytes:
    """GET ``path`` through ``chain`` (plain proxying, or CONNECT if ``tunnel``); return the body.

    Parsed with h11, so a chain that re-frames the body (chunked) is still read correctly.
    """
    if tunnel or chain.proxy_port is None:
        reader, writer = await open_tunnel(chain, target)
        request_target = path.encode()
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", chain.proxy_port)
        request_target = target.url(path).encode()
    conn = h11.Connection(h11.CLIENT)
    body = bytearray()
    try:
        headers = [("Host", target.authority), ("Connection", "close")]
        writer.write(conn.send(h11.Request(method="GET", target=request_target, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(256 * 1024))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise BenchError(f"GET {path} via {chain.name}: status {event.status_code}")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise BenchError(f"GET {path} via {chain.name}: unexpected {event!r}")
    finally:
        writer.close()
