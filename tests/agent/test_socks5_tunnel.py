"""SOCKS5 connections served by callbacks (fluidity.agent.socks5_tunnel) on the running agent:
no task once the tunnel runs, half-close, early bytes, byte counters, a reset when the link dies,
the link-down path, and shutdown."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths

from ..integration.stack import echo_handler, running_server, tcp_server
from ..integration.test_connect_tunnel import running_agent, until
from .helpers import connect_request
from .helpers import running_agent as starting_agent

pytestmark = pytest.mark.timeout(60)

GREETING = b"\x05\x01\x00"
SUCCEEDED = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)


def socks_idle(agent: Agent) -> bool:
    socks = agent.clients.socks
    assert socks is not None
    return socks.active_connections == 0 and socks.task_less_connections == 0


async def socks_tunnel(
    agent: Agent, port: int, early: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
    writer.write(GREETING + connect_request("127.0.0.1", port) + early)
    assert await reader.readexactly(len(SUCCEEDED)) == SUCCEEDED
    return reader, writer


async def test_an_open_socks_tunnel_holds_no_task_and_honours_half_close(pki: PkiPaths) -> None:
    payload = hashlib.sha256(b"socks").digest() * (1024 * 1024 // 32)
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(echo_handler) as echo_port,
    ):
        socks = agent.clients.socks
        assert socks is not None
        baseline = len(asyncio.all_tasks())
        reader, writer = await socks_tunnel(agent, echo_port, early=b"sent-early")
        assert await reader.readexactly(10) == b"sent-early"  # forwarded once the stream opened
        assert len(asyncio.all_tasks()) - baseline == 1  # the echo origin's handler only
        assert socks.task_less_connections == 1 and socks.active_connections == 1
        writer.write(payload)
        writer.write_eof()  # the client's half-close reaches the origin as EOF...
        echoed = await reader.read(-1)  # ...whose own EOF comes back through the tunnel
        writer.close()
        await until(lambda: socks_idle(agent))
        assert socks.bytes_sent == socks.bytes_received == len(payload) + 10
        assert socks.total_connections == 1
    assert echoed == payload


async def test_link_lost_mid_tunnel_resets_the_socks_client(pki: PkiPaths) -> None:
    async with tcp_server(echo_handler) as echo_port:
        server_cm = running_server(pki)
        server = await server_cm.__aenter__()
        try:
            async with running_agent(pki, server.port) as agent:
                reader, writer = await socks_tunnel(agent, echo_port)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                await server_cm.__aexit__(None, None, None)
                server_cm = None
                with pytest.raises(ConnectionResetError):  # a FIN would say the data ended well
                    await asyncio.wait_for(reader.read(-1), 10)
                writer.close()
                await until(lambda: socks_idle(agent))
        finally:
            if server_cm is not None:
                await server_cm.__aexit__(None, None, None)


async def test_a_request_before_the_link_is_up_waits_for_it_then_tunnels(
    pki: PkiPaths, free_port: int
) -> None:
    async with (
        tcp_server(echo_handler) as echo_port,
        starting_agent(pki, free_port, tunnel={"link_wait_timeout": 10}) as agent,
    ):
        socks = agent.clients.socks
        assert socks is not None
        # No server yet: the open waits (in a short task) for a link within link_wait_timeout.
        opening = asyncio.create_task(socks_tunnel(agent, echo_port))
        await until(lambda: socks.active_connections == 1)
        async with running_server(pki, listen_port=free_port):
            reader, writer = await asyncio.wait_for(opening, 10)
            writer.write(b"late")
            assert await reader.readexactly(4) == b"late"
            assert socks.task_less_connections == 1  # a callback tunnel from then on
            writer.close()
            await until(lambda: socks_idle(agent))


async def test_stopping_the_agent_closes_open_socks_tunnels(pki: PkiPaths) -> None:
    async with running_server(pki) as server, tcp_server(echo_handler) as echo_port:
        async with running_agent(pki, server.port) as agent:
            clients = [await socks_tunnel(agent, echo_port) for _ in range(10)]
            socks = agent.clients.socks
            assert socks is not None and socks.task_less_connections == 10
        for reader, writer in clients:
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()
        assert socks.task_less_connections == 0 and socks.active_connections == 0
