"""A slow, narrow link between agent and server: 200 ms round trip (100 ms each way), 1 MiB/s cap.

Transfers must stay byte-exact both ways, and small interactive requests on other streams must
still complete while one bulk download saturates the link: the per-stream window and round-robin
scheduling keep the bulk stream from filling the queues ahead of them. The p99 latency of the
interactive requests, loaded over unloaded, is printed (and recorded in docs/hardening.md); it is
a measurement, not an assertion.

It runs with the default settings, with the 256 KiB window and with the 64 KiB frames
docs/hardening.md mentions for narrow links. An interactive reply waits behind the bulk stream's
bytes in flight, so the window sets the loaded latency (1 MiB at 1 MiB/s is a second), and behind
up to a frame of it queued before its own in the server's turn (a 256 KiB frame at 1 MiB/s is a
quarter of a second). Window tuning (wire/window_tuning.py) must see the queue: grow no window,
and cut the 1 MiB initial window, five times what this path holds, after its first probe round.
The loaded requests are also reported once that has happened (the last half of them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from fluidity.certs import PkiPaths
from fluidity.config import TunnelConfig
from tests.integration.origins import HttpOrigin, pattern_chunks, pattern_sha256
from tests.integration.stack import running_server
from tests.integration.test_agent import running_agent

from .relay import FaultRelay
from .support import fetch, percentile

MiB = 1024 * 1024
RATE = 1 * MiB  # bytes per second, each direction
ONE_WAY = 0.1  # seconds


async def _interactive(proxy_port: int, origin: HttpOrigin, count: int) -> list[float]:
    """Small requests one after the other, each on a new stream; their latencies in seconds."""
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        result = await fetch(proxy_port, origin.url("/bytes/2000"), timeout=30)
        assert result.ok and result.sha256 == pattern_sha256(2000), result
        latencies.append(time.monotonic() - started)
    return latencies


async def _upload(proxy_port: int, origin: HttpOrigin, size: int) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(
        f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )
    for piece in pattern_chunks(size, 64 * 1024):
        writer.write(piece)
        await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    info: dict[str, object] = json.loads(body)
    return info


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "tuning",
    [{}, {"stream_window": 256 * 1024}, {"max_frame_size": 64 * 1024}],
    ids=["defaults", "256k-window", "64k-frames"],
)
async def test_slow_narrow_link_keeps_transfers_exact_and_interactive_requests_moving(
    pki: PkiPaths, tuning: dict[str, int]
) -> None:
    window = tuning.get("stream_window", TunnelConfig().stream_window)
    # Each loaded interactive request can wait behind a window of bulk bytes in flight; the
    # download must outlast twelve of them, or the loaded figures measure an idle link.
    bulk_size = 16 * window
    async with (
        HttpOrigin() as origin,
        running_server(pki, **tuning) as server,
        FaultRelay(server.port, latency=ONE_WAY, rate=RATE) as relay,
        running_agent(pki, relay.port, tunnel=tuning) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        await _interactive(agent.proxy_port, origin, 1)  # warm-up: the link's first stream
        unloaded = await _interactive(agent.proxy_port, origin, 8)

        started = time.monotonic()
        bulk = asyncio.create_task(
            fetch(agent.proxy_port, origin.url(f"/bytes/{bulk_size}"), timeout=90)
        )
        await asyncio.sleep(0.5)  # let the bulk stream fill the link first
        loaded = await _interactive(agent.proxy_port, origin, 12)
        still_running = not bulk.done()
        download = await bulk
        bulk_seconds = time.monotonic() - started

        upload = await _upload(agent.proxy_port, origin, MiB)
        assert relay.accepted == 1  # one link carried it all
        (link,) = agent.tunnel.links
        tuner = link.session.window_tuner
        assert tuner is not None and tuner.probes_sent > 1
        # The narrow hop's queue, not the window, holds the download back: growing the window
        # would only make interactive replies wait longer behind it.
        assert tuner.windows_grown == 0
        if window >= MiB:
            assert tuner.windows_shrunk >= 1, "a 1 MiB window queues 0.8 s on this path"

    assert download.ok and download.sha256 == pattern_sha256(bulk_size), download
    assert upload["body_length"] == MiB
    sent = hashlib.sha256(b"".join(pattern_chunks(MiB, 64 * 1024))).hexdigest()
    assert upload["body_sha256"] == sent
    assert still_running, "the bulk download ended before the interactive requests: no overlap"
    p99_unloaded, p99_loaded = percentile(unloaded, 0.99), percentile(loaded, 0.99)
    settled = percentile(loaded[len(loaded) // 2 :], 0.5)
    print(
        f"\nslow link, {tuning or 'defaults'}: "
        f"bulk {bulk_size / MiB:.0f} MiB in {bulk_seconds:.1f}s "
        f"({bulk_size / bulk_seconds / MiB:.2f} MiB/s of {RATE / MiB:.0f} MiB/s cap); "
        f"windows shrunk {tuner.windows_shrunk}; interactive p99 unloaded "
        f"{p99_unloaded * 1000:.0f} ms, loaded {p99_loaded * 1000:.0f} ms, ratio "
        f"{p99_loaded / p99_unloaded:.2f}; loaded p50 of the last half {settled * 1000:.0f} ms; "
        f"unloaded {[round(x, 3) for x in unloaded]} loaded {[round(x, 3) for x in loaded]}"
    )
