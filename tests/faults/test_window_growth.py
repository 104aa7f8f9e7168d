"""Stream windows grow on a long path (40 ms round trip), both ways, and give their growth back.

A 1 MiB window over 40 ms caps one stream at about 26 MB/s; the agent (downloads) and the server
(uploads) grow the window of a stream that is held back by it (wire/window_tuning.py). Checked
here: the bytes are exact, the windows grew, no window passed ``max_stream_window``, and the link's
growth budget is whole again once the streams are done. The durations with fixed and with growing
windows are printed (a measurement for docs/benchmarks.md, not an assertion).
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time

import pytest

from fluidity.certs import PkiPaths
from fluidity.config import TunnelConfig
from fluidity.wire import Session
from tests.integration.origins import HttpOrigin, pattern_chunks, pattern_sha256
from tests.integration.stack import running_server
from tests.integration.test_agent import running_agent

from .relay import FaultRelay
from .support import fetch
from .test_slow_link import _upload

MiB = 1024 * 1024
ONE_WAY = 0.02  # seconds
SIZE = 48 * MiB


def _grown(session: Session) -> int:
    tuner = session.window_tuner
    return tuner.windows_grown if tuner is not None else 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("growth", [False, True], ids=["fixed-window", "growing-window"])
async def test_windows_grow_on_a_long_path_and_the_budget_comes_back(
    pki: PkiPaths, growth: bool
) -> None:
    tuning = {} if growth else {"max_stream_window": 0}
    async with (
        HttpOrigin() as origin,
        running_server(pki, **tuning) as server,
        FaultRelay(server.port, latency=ONE_WAY) as relay,
        running_agent(pki, relay.port, tunnel=tuning) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        started = time.monotonic()
        download = await fetch(agent.proxy_port, origin.url(f"/bytes/{SIZE}"), timeout=90)
        download_seconds = time.monotonic() - started
        started = time.monotonic()
        upload = await _upload(agent.proxy_port, origin, SIZE // 2)
        upload_seconds = time.monotonic() - started
        await asyncio.sleep(0.2)  # the streams' last frames (END, WINDOW) cross the link
        assert agent.clients.status is not None
        status = agent.clients.status.snapshot()["link"]
        (agent_link,) = agent.tunnel.links
        (server_link,) = server.links
        agent_session, server_session = agent_link.session, server_link.session
        assert relay.accepted == 1

    assert download.ok and download.sha256 == pattern_sha256(SIZE), download
    assert upload["body_length"] == SIZE // 2
    sent = hashlib.sha256(b"".join(pattern_chunks(SIZE // 2, 64 * 1024))).hexdigest()
    assert upload["body_sha256"] == sent
    print(
        f"\n40 ms round trip, {'growing' if growth else 'fixed 1 MiB'} windows: "
        f"{SIZE / MiB:.0f} MiB down in {download_seconds:.2f}s "
        f"({SIZE / download_seconds / MiB:.1f} MiB/s), {SIZE / 2 / MiB:.0f} MiB up in "
        f"{upload_seconds:.2f}s ({SIZE / 2 / upload_seconds / MiB:.1f} MiB/s); "
        f"windows grown: agent {_grown(agent_session)}, server {_grown(server_session)}"
    )
    if not growth:
        assert agent_session.window_tuner is None and server_session.window_tuner is None
        return
    defaults = TunnelConfig()
    assert status["windows_grown"] >= 2 and status["window_growth_bytes"] == 0  # all given back
    for session in (agent_session, server_session):
        tuner = session.window_tuner
        assert tuner is not None
        assert tuner.windows_grown >= 2, "a 1 MiB window at 40 ms holds a stream back"
        assert tuner.budget_left == defaults.stream_window_budget  # every stream gave it back
        assert 0.035 < tuner.min_round_trip < 0.2
    assert defaults.max_stream_window == 32 * MiB  # what the growth above was capped at


@pytest.mark.timeout(120)
async def test_a_window_that_overshoots_a_bottleneck_shrinks_and_the_budget_comes_back(
    pki: PkiPaths,
) -> None:
    # 50 MB/s behind a 4 MiB router queue, 40 ms round trip: the bandwidth-delay product is
    # 2 MB, so the doubling from 2 to 4 MiB queues about 2 MB (40 ms) until the window shrinks.
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        FaultRelay(server.port, latency=ONE_WAY, rate=50e6, queue_limit=4 * MiB) as relay,
        running_agent(pki, relay.port) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        download = asyncio.ensure_future(
            fetch(agent.proxy_port, origin.url(f"/bytes/{SIZE}"), timeout=90)
        )
        round_trips = []
        while not download.done():  # a page opened meanwhile, on the same link
            started = time.monotonic()
            small = await fetch(agent.proxy_port, origin.url("/bytes/100"), timeout=30)
            assert small.ok and small.received == 100, small
            round_trips.append((time.monotonic() - started) * 1000)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the streams' last frames (END, WINDOW) cross the link
        (agent_link,) = agent.tunnel.links
        tuner = agent_link.session.window_tuner
        assert agent.clients.status is not None
        status = agent.clients.status.snapshot()["link"]
        assert relay.accepted == 1

    result = download.result()
    assert result.ok and result.sha256 == pattern_sha256(SIZE), result
    assert tuner is not None
    assert tuner.windows_grown >= 1 and tuner.windows_shrunk >= 1
    assert status["windows_shrunk"] == tuner.windows_shrunk
    assert tuner.budget_left == TunnelConfig().stream_window_budget  # all given back
    third = max(1, len(round_trips) // 3)
    print(
        f"\n50 MB/s, 40 ms: {SIZE / MiB:.0f} MiB down; windows grown {tuner.windows_grown}, "
        f"shrunk {tuner.windows_shrunk}; a small GET beside it took "
        f"{statistics.median(round_trips[:third]):.0f} ms (first third, median), "
        f"{statistics.median(round_trips[-third:]):.0f} ms (last third), "
        f"{len(round_trips)} GETs"
    )
