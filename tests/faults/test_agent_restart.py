"""The agent process restarted (crash or stop) while clients are connected.

Clients in the middle of a download, inside a CONNECT tunnel, or idle on a keep-alive connection
must see their connection end (never hang, never a download that claims success with wrong
bytes); the server must let go of the old link and its streams; and once the agent is back on the
same port, new connections work.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths
from tests.integration.origins import HttpOrigin, pattern_sha256
from tests.integration.stack import running_server, source_handler, tcp_server
from tests.integration.test_agent import connect_via

from .support import FLUIDITY, Proc, fetch, free_port, wait_port, write_agent_config

MiB = 1024 * 1024
HANG = 10.0


async def _wait_for(predicate: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def _read_until_end(reader: asyncio.StreamReader) -> str:
    try:
        while await reader.read(1 << 20):
            pass
    except OSError as exc:
        return type(exc).__name__
    return "eof"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_agent_restart_ends_client_connections_cleanly_and_service_resumes(
    pki: PkiPaths, tmp_path: Path, how: signal.Signals
) -> None:
    size = 1024 * MiB
    proxy_port = free_port()
    async with (
        HttpOrigin() as origin,
        tcp_server(source_handler(1 << 30)) as endless,
        running_server(pki) as server,
    ):
        config = write_agent_config(tmp_path / "agent.yaml", pki, server.port, proxy_port)
        agent = Proc(tmp_path, "agent", [*FLUIDITY, "agent", "--config", str(config)])
        try:
            agent.start()
            await wait_port(proxy_port, agent)
            assert (await fetch(proxy_port, origin.url("/bytes/100"))).ok

            # An idle keep-alive client, a raw tunnel and a big download, all in progress.
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            idle_writer.write(f"GET {origin.url('/bytes/10')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await idle_reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await idle_reader.readexactly(10)
            tunnel_reader, tunnel_writer, head = await connect_via(
                proxy_port, f"127.0.0.1:{endless}"
            )
            assert head.startswith(b"HTTP/1.1 200")
            await tunnel_reader.readexactly(MiB)
            progress = asyncio.Event()
            download = asyncio.create_task(
                fetch(proxy_port, origin.url(f"/bytes/{size}"), progress=progress, timeout=60)
            )
            await asyncio.wait_for(progress.wait(), 20)
            assert server.stats.active_streams >= 2

            agent.signal(how)
            await agent.wait_exit(15)
            transfer = await asyncio.wait_for(download, HANG)
            tunnel_end = await asyncio.wait_for(_read_until_end(tunnel_reader), HANG)
            idle_end = await asyncio.wait_for(_read_until_end(idle_reader), HANG)
            for writer in (idle_writer, tunnel_writer):
                writer.close()
            assert not transfer.ok or transfer.sha256 == pattern_sha256(size), transfer
            assert transfer.error and "hung" not in transfer.error, transfer
            assert tunnel_end in ("eof", "ConnectionResetError")
            assert idle_end in ("eof", "ConnectionResetError")
            # The server lets go of the dead agent's link and every stream on it.
            await _wait_for(lambda: not server.links and server.stats.active_streams == 0, HANG)

            agent.start()
            await wait_port(proxy_port, agent)
            again = await fetch(proxy_port, origin.url(f"/bytes/{8 * MiB}"), timeout=30)
            assert again.ok and again.sha256 == pattern_sha256(8 * MiB), again
            reader, writer, head = await connect_via(proxy_port, f"127.0.0.1:{endless}")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(MiB)
            writer.close()
        finally:
            agent.stop()
    if how == signal.SIGTERM:
        assert "agent.stopped" in agent.log()
