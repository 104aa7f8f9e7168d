"""Faults on the link between agent and server: a killed, frozen or vanished server, a dead path.

Each test puts the :class:`~tests.faults.relay.FaultRelay` or a real ``fluidity server`` process
between an in-process agent and its targets, breaks something, and checks three promises:
clients get an error promptly (never a hang, never a transfer that claims success with wrong
bytes), the agent notices and says why in its log, and service comes back by itself.

Keepalive is configured short here (PING every 0.3 s, dead after 1.5 s) so that "the agent
declares the link dead within the keepalive timeout" is observable in a test; upper bounds on
waits are hang detectors with generous margins, not performance assertions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths
from tests.integration.origins import HttpOrigin, pattern_sha256
from tests.integration.stack import running_server, source_handler, tcp_server
from tests.integration.test_agent import connect_via, running_agent

from .relay import FaultRelay
from .support import FLUIDITY, Proc, fetch, free_port, wait_port, write_server_config

MiB = 1024 * 1024
KEEPALIVE = {"keepalive_interval": 0.3, "keepalive_timeout": 1.5}
SHORT_TUNNEL = {
    **KEEPALIVE,
    "connect_timeout": 1.0,
    "reconnect_initial": 0.2,
    "reconnect_max": 1.0,
    "link_wait_timeout": 5.0,
}
HANG = 1.5 + 5.0  # keepalive timeout plus a generous margin for a loaded 2-core machine


async def _drain_until_error(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read a tunnel until it ends; return the bytes read and how it ended."""
    total = 0
    try:
        while data := await reader.read(1 << 20):
            total += len(data)
    except OSError as exc:
        return total, type(exc).__name__
    return total, "eof"


@pytest.fixture
def server_proc(tmp_path: Path, pki: PkiPaths) -> Iterator[Proc]:
    port = free_port()
    config = write_server_config(
        tmp_path / "server.yaml", pki, port, keepalive_interval="300ms", keepalive_timeout="1500ms"
    )
    proc = Proc(tmp_path, "server", [*FLUIDITY, "server", "--config", str(config)])
    proc.port = port
    yield proc
    proc.stop()


async def test_server_sigkill_mid_download_fails_transfers_and_agent_reconnects_with_backoff(
    pki: PkiPaths, server_proc: Proc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    size = 48 * MiB
    server_proc.start()
    await wait_port(server_proc.port, server_proc)
    # The relay in front of the server only counts connection attempts (no faults).
    async with (
        HttpOrigin() as origin,
        tcp_server(source_handler(1 << 30)) as endless,
        FaultRelay(server_proc.port) as relay,
        running_agent(pki, relay.port, tunnel=SHORT_TUNNEL) as agent,
    ):
        small = await fetch(agent.proxy_port, origin.url("/bytes/1000"))
        assert small.ok and small.sha256 == pattern_sha256(1000)

        started = [asyncio.Event() for _ in range(4)]
        downloads = [
            asyncio.create_task(
                fetch(agent.proxy_port, origin.url(f"/bytes/{size}"), progress=event, timeout=60)
            )
            for event in started
        ]
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{endless}")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(MiB)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)

        server_proc.signal(signal.SIGKILL)
        killed = time.monotonic()
        transfers = await asyncio.wait_for(asyncio.gather(*downloads), HANG)
        _, tunnel_end = await asyncio.wait_for(_drain_until_error(reader), HANG)
        ended_after = time.monotonic() - killed
        writer.close()

        for transfer in transfers:
            if transfer.ok:  # whatever claims success must carry exactly the right bytes
                assert transfer.sha256 == pattern_sha256(size)
            else:
                assert transfer.error and "hung" not in transfer.error, transfer
        assert not all(t.ok for t in transfers), "the kill landed after every download finished"
        # A raw tunnel has no framing: only a reset tells its client the bytes were cut short.
        assert tunnel_end == "ConnectionResetError", tunnel_end
        print(
            f"transfers ended {ended_after:.2f}s after SIGKILL: "
            f"{[t.error or 'ok' for t in transfers]}; tunnel {tunnel_end}"
        )

        # Down: attempts back off instead of spinning.
        attempts_before = relay.accepted
        await asyncio.sleep(3.0)
        attempts = relay.accepted - attempts_before
        assert 1 <= attempts <= 8, f"{attempts} reconnect attempts in 3 s (backoff 0.2 s → 1 s)"
        assert agent.tunnel.state == "reconnecting"
        down = await fetch(agent.proxy_port, origin.url("/bytes/10"), timeout=15)
        assert down.status == 503, down

        server_proc.start()
        await wait_port(server_proc.port, server_proc)
        assert await agent.tunnel.wait_connected(10)
        again = await fetch(agent.proxy_port, origin.url(f"/bytes/{4 * MiB}"))
        assert again.ok and again.sha256 == pattern_sha256(4 * MiB), again
    log = caplog.text
    assert "link.down" in log and "link.up" in log.split("link.down", 1)[1]


async def test_black_holed_link_is_declared_dead_within_keepalive_and_recovers(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        HttpOrigin() as origin,
        tcp_server(source_handler(1 << 30)) as endless,
        running_server(pki, keepalive_interval=0.3, keepalive_timeout=1.5) as server,
        FaultRelay(server.port) as relay,
        running_agent(pki, relay.port, tunnel=SHORT_TUNNEL) as agent,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{endless}")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(MiB)

        relay.black_hole()  # no FIN, no RST: the path just stops
        cut = time.monotonic()
        _, how = await asyncio.wait_for(_drain_until_error(reader), HANG)
        noticed = time.monotonic() - cut
        writer.close()
        assert how == "ConnectionResetError", how
        assert "no answer from the server for 1.5s" in caplog.text
        # Requests while the path is dead wait for a link, then get 503 (never hang).
        down = await fetch(agent.proxy_port, origin.url("/bytes/10"), timeout=15)
        assert down.status == 503, down
        # The server notices too and frees the link.
        await _wait_for(lambda: not server.links, HANG)
        assert "link.dead" in caplog.text

        relay.restore()
        assert await agent.tunnel.wait_connected(10), agent.tunnel.last_error
        again = await fetch(agent.proxy_port, origin.url(f"/bytes/{2 * MiB}"))
        assert again.ok and again.sha256 == pattern_sha256(2 * MiB)
        print(f"black hole noticed after {noticed:.2f}s (keepalive timeout 1.5s), tunnel {how}")
    assert noticed < HANG


async def test_frozen_server_sigstop_is_declared_dead_and_link_returns_after_sigcont(
    pki: PkiPaths, server_proc: Proc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    server_proc.start()
    await wait_port(server_proc.port, server_proc)
    async with (
        HttpOrigin() as origin,
        tcp_server(source_handler(1 << 30)) as endless,
        running_agent(pki, server_proc.port, tunnel=SHORT_TUNNEL) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{endless}")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(MiB)
        in_flight = asyncio.create_task(
            fetch(agent.proxy_port, origin.url(f"/bytes/{64 * MiB}"), timeout=60)
        )

        server_proc.signal(signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            _, how = await asyncio.wait_for(_drain_until_error(reader), HANG)
            noticed = time.monotonic() - frozen
            assert how == "ConnectionResetError", how
            transfer = await asyncio.wait_for(in_flight, HANG)
            writer.close()
            assert not transfer.ok or transfer.sha256 == pattern_sha256(64 * MiB)
            assert "no answer from the server for 1.5s" in caplog.text
            assert agent.tunnel.state == "reconnecting"
        finally:
            server_proc.signal(signal.SIGCONT)
        assert await agent.tunnel.wait_connected(15), agent.tunnel.last_error
        again = await fetch(agent.proxy_port, origin.url(f"/bytes/{2 * MiB}"))
        assert again.ok and again.sha256 == pattern_sha256(2 * MiB)
        print(f"SIGSTOP noticed after {noticed:.2f}s (keepalive timeout 1.5s)")
    assert noticed < HANG


async def test_half_open_link_lost_fin_is_detected_by_keepalive(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        FaultRelay(server.port) as relay,
        running_agent(pki, relay.port, tunnel=SHORT_TUNNEL) as agent,
    ):
        assert (await fetch(agent.proxy_port, origin.url("/bytes/100"))).ok
        relay.half_open()  # the server's side closes; its FIN never reaches the agent
        await _wait_for(lambda: not server.links, 5)
        cut = time.monotonic()
        await _wait_for(lambda: agent.tunnel.state == "reconnecting" or relay.accepted > 1, HANG)
        noticed = time.monotonic() - cut
        assert await agent.tunnel.wait_connected(10)
        again = await fetch(agent.proxy_port, origin.url(f"/bytes/{MiB}"))
        assert again.ok and again.sha256 == pattern_sha256(MiB)
    assert "no answer from the server" in caplog.text
    assert noticed < HANG


async def test_reset_link_fails_streams_at_once_and_reconnects(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        HttpOrigin() as origin,
        tcp_server(source_handler(1 << 30)) as endless,
        running_server(pki) as server,
        FaultRelay(server.port) as relay,
        running_agent(pki, relay.port, tunnel=SHORT_TUNNEL) as agent,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{endless}")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(MiB)
        relay.reset_all()
        _, how = await asyncio.wait_for(_drain_until_error(reader), 5)  # before any keepalive
        assert how == "ConnectionResetError", how
        writer.close()
        assert await agent.tunnel.wait_connected(10)
        again = await fetch(agent.proxy_port, origin.url(f"/bytes/{MiB}"))
        assert again.ok and again.sha256 == pattern_sha256(MiB)
        await _wait_for(lambda: server.stats.active_streams == 0, 5)
    assert "link.down" in caplog.text


async def _wait_for(predicate: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)
