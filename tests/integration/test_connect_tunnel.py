"""Task-less CONNECT tunnels (fluidity.agent.connect_tunnel) through the whole agent and a server:
half-close both ways, backpressure both ways, open failures, shutdown, and the cases left to the
task-based session (split heads, proxy authentication)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig

from .stack import echo_handler, expected_source_digest, running_server, source_handler, tcp_server
from .test_agent import connect_via
from .test_agent import running_agent as starting_agent

MiB = 1024 * 1024
LOOPBACK = EgressConfig(allow_cidrs=["127.0.0.1/32"])


async def until(condition: object, seconds: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_agent(pki: PkiPaths, server_port: int, **overrides: Any) -> AsyncIterator[Agent]:
    """A started agent whose link is up: a CONNECT can be served at once."""
    async with starting_agent(pki, server_port, **overrides) as agent:
        assert await agent.tunnel.wait_connected(5), agent.tunnel.last_error
        yield agent


def idle(agent: Agent) -> bool:
    return agent.proxy.active_connections == 0 and agent.proxy.task_less_connections == 0


async def test_tunnel_echoes_with_half_close_and_holds_no_task(pki: PkiPaths) -> None:
    await _echo_through_a_task_less_tunnel(pki)


@pytest.mark.stdlib_loop
async def test_tunnel_works_the_same_on_the_asyncio_loop(pki: PkiPaths) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")
    await _echo_through_a_task_less_tunnel(pki)


async def _echo_through_a_task_less_tunnel(pki: PkiPaths) -> None:
    payload = hashlib.sha256(b"tunnel").digest() * (2 * MiB // 32)
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        baseline = len(asyncio.all_tasks())
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{echo_port}")
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        writer.write(payload[:32])
        assert await reader.readexactly(32) == payload[:32]
        # One task more: the echo origin's handler. The tunnel itself has none.
        assert len(asyncio.all_tasks()) - baseline == 1
        assert agent.proxy.task_less_connections == 1
        assert agent.proxy.active_connections == 1
        writer.write(payload[32:])
        writer.write_eof()  # the client's half-close reaches the origin as EOF...
        echoed = await reader.read(-1)  # ...whose own EOF comes back through the tunnel
        writer.close()
        await until(lambda: idle(agent))
        assert agent.proxy.requests == 1
    assert payload[:32] + echoed == payload


async def test_bytes_sent_with_the_head_go_through_once_the_stream_opens(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
        target = f"127.0.0.1:{echo_port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly bytes".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(11) == b"early bytes"
        assert agent.proxy.task_less_connections == 1
        writer.close()
        await until(lambda: idle(agent))


async def test_origin_that_closes_first_ends_the_download_cleanly(pki: PkiPaths) -> None:
    size = 8 * MiB
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(source_handler(size)) as source_port,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{source_port}")
        assert head.startswith(b"HTTP/1.1 200")
        digest = hashlib.sha256()
        while chunk := await reader.read(256 * 1024):  # ends with a FIN, not a reset
            digest.update(chunk)
        # The client's direction is still open after the origin's EOF: closing it ends the tunnel.
        assert agent.proxy.task_less_connections == 1
        writer.close()
        await until(lambda: idle(agent))
    assert digest.hexdigest() == expected_source_digest(size)


async def test_client_that_stops_reading_stops_the_origin_within_a_window(pki: PkiPaths) -> None:
    size = 64 * MiB
    window = 256 * 1024
    async with (
        running_server(pki, stream_window=window) as server,
        running_agent(pki, server.port, tunnel={"stream_window": window}) as agent,
        tcp_server(source_handler(size)) as source_port,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{source_port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.transport.pause_reading()  # the client reads nothing for a while
        await asyncio.sleep(0.5)
        link = agent.tunnel.links[0]
        (stream,) = link.streams.values()
        assert stream.buffered == 0  # pushed bytes wait in the client's socket, not the stream
        # Kernel buffers on the way hold a few MiB; the source is stopped long before its end.
        stalled_at = link.session.bytes_received
        assert stalled_at < size // 4
        await asyncio.sleep(0.2)
        assert link.session.bytes_received <= stalled_at + window
        writer.transport.resume_reading()
        digest = hashlib.sha256()
        received = 0
        while chunk := await reader.read(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
        writer.close()
        await until(lambda: idle(agent))
    assert received == size
    assert digest.hexdigest() == expected_source_digest(size)


async def test_origin_that_stops_reading_stops_the_client_within_the_stream_buffer(
    pki: PkiPaths,
) -> None:
    size = 64 * MiB
    may_read = asyncio.Event()
    received = hashlib.sha256()
    counted = [0]

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await may_read.wait()
        while data := await reader.read(256 * 1024):
            received.update(data)
            counted[0] += len(data)
        writer.close()

    payload = hashlib.sha256(b"upload").digest() * (size // 32)
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(slow_sink) as sink_port,
    ):
        _, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{sink_port}")
        assert head.startswith(b"HTTP/1.1 200")

        async def upload() -> None:
            view = memoryview(payload)
            for start in range(0, size, MiB):
                writer.write(view[start : start + MiB])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(upload())
        await asyncio.sleep(0.7)
        link = agent.tunnel.links[0]
        (stream_id,) = link.streams
        buffer = agent.config.tunnel.stream_buffer
        # The agent stopped reading the client: what it queued for the stream stays within the
        # stream buffer plus one read from the socket, and the client could not send it all.
        assert link.session.pending_bytes(stream_id) <= buffer + 256 * 1024
        assert not sending.done()
        may_read.set()
        await asyncio.wait_for(sending, 30)
        await until(lambda: counted[0] == size, 30)
        writer.close()
        await until(lambda: idle(agent))
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_refused_target_is_answered_502_with_the_reason_and_closed(
    pki: PkiPaths, free_port: int
) -> None:
    async with (
        running_server(pki, egress=LOOPBACK) as server,
        running_agent(pki, server.port) as agent,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{free_port}")
        rest = await reader.read(-1)  # the agent closes after the answer
        writer.close()
        assert head.startswith(b"HTTP/1.1 502")
        assert b"Connection: close" in head
        assert rest.startswith(b"fluidity: cannot reach 127.0.0.1:") and b"refused" in rest
        assert agent.proxy.open_failures == 1
        await until(lambda: idle(agent))


async def test_denied_target_is_answered_403(pki: PkiPaths) -> None:
    async with (
        running_server(pki, egress=EgressConfig()) as server,  # loopback denied
        running_agent(pki, server.port) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{echo_port}")
        rest = await reader.read(-1)
        writer.close()
        assert head.startswith(b"HTTP/1.1 403")
        assert b"egress policy" in rest
        await until(lambda: idle(agent))


async def test_link_lost_mid_tunnel_resets_the_client(pki: PkiPaths) -> None:
    async with tcp_server(echo_handler) as echo_port:
        server_cm = running_server(pki)
        server = await server_cm.__aenter__()
        try:
            async with running_agent(pki, server.port) as agent:
                reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{echo_port}")
                assert head.startswith(b"HTTP/1.1 200")
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                await server_cm.__aexit__(None, None, None)
                server_cm = None
                try:
                    ended = await asyncio.wait_for(reader.read(-1), 10)
                    how = f"clean end after {len(ended)} bytes"
                except ConnectionResetError:
                    how = "reset"
                writer.close()
                assert how == "reset"  # a FIN would say the bytes ended normally
                await until(lambda: idle(agent))
        finally:
            if server_cm is not None:
                await server_cm.__aexit__(None, None, None)


async def test_stopping_the_agent_closes_open_tunnels(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        tcp_server(echo_handler) as echo_port,
    ):
        agent_cm = running_agent(pki, server.port)
        agent = await agent_cm.__aenter__()
        tunnels = [await connect_via(agent.proxy_port, f"127.0.0.1:{echo_port}") for _ in range(20)]
        assert agent.proxy.task_less_connections == 20
        await asyncio.wait_for(agent_cm.__aexit__(None, None, None), 10)
        assert idle(agent)
        for reader, writer, _ in tunnels:
            # An EOF or a reset, within the bound: either way the agent let go of it.
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(-1), 5)
            writer.close()


async def test_split_head_is_served_by_the_session(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
        target = f"127.0.0.1:{echo_port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(f"Host: {target}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert agent.proxy.task_less_connections == 0
        assert agent.proxy.active_connections == 1
        writer.close()
        await until(lambda: idle(agent))


async def test_with_proxy_auth_the_session_answers_407_then_tunnels(pki: PkiPaths) -> None:
    users = {"users": [{"username": "ann", "password": "s3cret"}]}
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port, proxy_auth=users) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
        target = f"127.0.0.1:{echo_port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 407")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        token = base64.b64encode(b"ann:s3cret").decode()
        writer.write(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
        )  # same connection: the 407 kept it open
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        assert agent.proxy.task_less_connections == 0
        writer.close()
        await until(lambda: idle(agent))


async def test_connect_before_the_link_is_up_waits_in_the_session_then_tunnels(
    pki: PkiPaths, free_port: int
) -> None:
    async with (
        tcp_server(echo_handler) as echo_port,
        starting_agent(pki, free_port, tunnel={"link_wait_timeout": 10}) as agent,
    ):
        # No server yet: the CONNECT cannot be served at once and goes to the session, which
        # waits for a link within link_wait_timeout.
        connecting = asyncio.create_task(connect_via(agent.proxy_port, f"127.0.0.1:{echo_port}"))
        await until(lambda: agent.proxy.active_connections == 1)
        assert agent.proxy.task_less_connections == 0
        async with running_server(pki, listen_port=free_port):
            reader, writer, head = await asyncio.wait_for(connecting, 10)
            assert head.startswith(b"HTTP/1.1 200")
            writer.write(b"late")
            assert await reader.readexactly(4) == b"late"
            assert agent.proxy.task_less_connections == 0
            writer.close()
            await until(lambda: idle(agent))
