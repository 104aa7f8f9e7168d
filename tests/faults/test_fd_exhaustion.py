"""Running out of file descriptors (a low ``ulimit -n``, set with prlimit) on either side.

Server: every stream's target connection costs a descriptor. Once they run out, further opens
must be refused with a status the client can read (502 naming the cause), the server must log
the cause, a new agent link must wait (``server.accept_failed``, with back-off) rather than crash
the accept loop, and everything must work again once descriptors are free.

Agent: every client connection costs a descriptor. The proxy must answer 503 (not reset or hang)
past its budget, log ``http.refused``, keep serving the clients it has, and recover.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fluidity.certs import PkiPaths
from tests.integration.origins import HttpOrigin, pattern_sha256
from tests.integration.stack import running_server, source_handler, tcp_server
from tests.integration.test_agent import connect_via, running_agent

from .support import (
    FLUIDITY,
    Proc,
    fetch,
    free_port,
    open_fds,
    wait_port,
    write_agent_config,
    write_server_config,
)

MiB = 1024 * 1024
MAX_ATTEMPTS = 100  # far above either budget below: the loops are bounded whatever happens


async def test_server_out_of_descriptors_refuses_streams_with_502_logs_and_recovers(
    pki: PkiPaths, tmp_path: Path
) -> None:
    port = free_port()
    config = write_server_config(tmp_path / "server.yaml", pki, port)
    server = Proc(tmp_path, "server", [*FLUIDITY, "server", "--config", str(config)], nofile=40)
    server.start()
    try:
        await wait_port(port, server)
        async with (
            HttpOrigin() as origin,
            tcp_server(source_handler(1 << 30)) as endless,
            running_agent(pki, port) as agent,
        ):
            assert await agent.tunnel.wait_connected(10)
            link = agent.tunnel.links[0]
            held = []
            refusal = b""
            for _ in range(MAX_ATTEMPTS):
                reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{endless}")
                if not head.startswith(b"HTTP/1.1 200"):
                    refusal = head + await reader.read()
                    writer.close()
                    break
                await reader.readexactly(1024)
                held.append((reader, writer))
            assert refusal.startswith(b"HTTP/1.1 502"), refusal
            assert b"Too many open files" in refusal
            assert "Too many open files" in (await server.wait_log("stream.open_failed"))
            print(f"server refused stream {len(held) + 1} at {open_fds(server.pid)} descriptors")

            # A second agent cannot get in now: the accept loop says why and backs off.
            async with running_agent(pki, port, tunnel={"connect_timeout": 1.0}) as second:
                await server.wait_log('server.accept_failed reason="Too many open files"')
                assert second.tunnel.state != "connected"
                for _, writer in held:
                    writer.close()
                # Descriptors free up: everything recovers without a restart.
                assert await second.tunnel.wait_connected(15), second.tunnel.last_error
                again = await fetch(second.proxy_port, origin.url(f"/bytes/{MiB}"))
                assert again.ok and again.sha256 == pattern_sha256(MiB), again
            first = await fetch(agent.proxy_port, origin.url(f"/bytes/{MiB}"))
            assert first.ok and first.sha256 == pattern_sha256(MiB), first
            assert agent.tunnel.links == [link]  # the first agent's link survived it all
    finally:
        server.stop()


async def test_agent_out_of_descriptors_answers_503_logs_and_recovers(
    pki: PkiPaths, tmp_path: Path
) -> None:
    proxy_port = free_port()
    async with HttpOrigin() as origin, running_server(pki) as server:
        config = write_agent_config(tmp_path / "agent.yaml", pki, server.port, proxy_port)
        agent = Proc(tmp_path, "agent", [*FLUIDITY, "agent", "--config", str(config)], nofile=64)
        agent.start()
        try:
            await wait_port(proxy_port, agent)
            request = f"GET {origin.url('/bytes/100')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            held = []
            refusal = b""
            for _ in range(MAX_ATTEMPTS):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.write(request)
                try:
                    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    raise AssertionError(f"connection {len(held) + 1} dropped: {exc!r}") from exc
                if not answer.startswith(b"HTTP/1.1 200"):
                    refusal = answer + await asyncio.wait_for(reader.read(), 10)
                    writer.close()
                    break
                await reader.readexactly(100)
                held.append((reader, writer))
            assert refusal.startswith(b"HTTP/1.1 503"), refusal
            assert b"Retry-After: 1" in refusal and b"client connections" in refusal
            assert "http.refused" in await agent.wait_log("http.refused")
            # The clients already in are still served.
            reader, writer = held[0]
            writer.write(request)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(100)
            print(f"agent refused client {len(held) + 1} at {open_fds(agent.pid)} descriptors")
            for _, writer in held:
                writer.close()
            again = None
            for _ in range(50):  # the agent notices the closes within a few loop turns
                again = await fetch(proxy_port, origin.url(f"/bytes/{MiB}"))
                if again.status != 503:
                    break
                await asyncio.sleep(0.1)
            assert again is not None and again.ok and again.sha256 == pattern_sha256(MiB), again
        finally:
            agent.stop()
