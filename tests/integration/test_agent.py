"""The whole agent (proxy + tunnel) with an in-process server: CONNECT at scale, egress, outages."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths
from fluidity.config import AgentConfig, EgressConfig, HttpConfig
from fluidity.errors import ConfigError

from .origins import HttpOrigin
from .stack import expected_source_digest, running_server, source_handler, tcp_server, tunnel_config


def agent_config(pki: PkiPaths, server_port: int, **overrides: Any) -> AgentConfig:
    tunnel = overrides.pop("tunnel", {})
    values: dict[str, Any] = {
        "server_ip": "127.0.0.1",
        "server_port": server_port,
        "local_proxy_port": 0,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key,
        "ca_cert_file": pki.ca_cert,
        "tunnel": tunnel_config(**tunnel),
    }
    values.update(overrides)
    return AgentConfig(**values)


@asynccontextmanager
async def running_agent(pki: PkiPaths, server_port: int, **overrides: Any) -> AsyncIterator[Agent]:
    agent = Agent(agent_config(pki, server_port, **overrides))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(grace=0)


async def connect_via(
    proxy_port: int, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def http_get(proxy_port: int, url: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


async def test_thousand_concurrent_connect_tunnels_through_one_link(pki: PkiPaths) -> None:
    size = 256 * 1024
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(source_handler(size)) as port,
    ):

        async def one() -> str:
            reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200")
            data = await reader.read(-1)
            writer.close()
            return hashlib.sha256(data).hexdigest()

        digests = await asyncio.gather(*(one() for _ in range(1000)))
        assert len(agent.tunnel.links) == 1
        assert server.stats.snapshot().streams_opened == 1000
    assert digests == [expected_source_digest(size)] * 1000


async def test_denied_target_gets_403_with_the_reason_and_allowed_config_lets_it_through(
    pki: PkiPaths,
) -> None:
    async with tcp_server(source_handler(10)) as port:
        async with (
            running_server(pki, egress=EgressConfig()) as server,
            running_agent(pki, server.port) as agent,
        ):
            status, body = await http_get(agent.proxy_port, f"http://127.0.0.1:{port}/")
        assert status == 403
        assert b"egress policy" in body and b"loopback" in body
        allowed = EgressConfig(allow_cidrs=["127.0.0.1/32"])
        async with (
            running_server(pki, egress=allowed) as server,
            running_agent(pki, server.port) as agent,
        ):
            reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200")
            assert len(await reader.read(-1)) == 10
            writer.close()


async def test_requests_while_the_link_is_down_get_503_after_the_wait(
    pki: PkiPaths, free_port: int
) -> None:
    async with running_agent(pki, free_port, tunnel={"link_wait_timeout": 0.3}) as agent:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await http_get(agent.proxy_port, "http://127.0.0.1:9/")
        waited = loop.time() - started
    assert status == 503
    assert b"tunnel" in body and b"down" in body
    assert 0.25 <= waited < 5


async def test_request_waits_for_a_link_that_comes_up_in_time(
    pki: PkiPaths, free_port: int
) -> None:
    async with (
        HttpOrigin() as origin,
        running_agent(pki, free_port, tunnel={"link_wait_timeout": 10}) as agent,
    ):
        url = f"http://127.0.0.1:{origin.port}/status/200"
        request = asyncio.create_task(http_get(agent.proxy_port, url))
        await asyncio.sleep(0.3)
        assert not request.done()  # waiting for a link, not failing
        async with running_server(pki, listen_port=free_port):
            status, _ = await asyncio.wait_for(request, 10)
    assert status == 200


async def test_in_flight_tunnels_end_promptly_when_the_server_goes_away(pki: PkiPaths) -> None:
    async with tcp_server(source_handler(1 << 30)) as port, running_server(pki) as server:
        agent = Agent(agent_config(pki, server.port))
        await agent.start()
        reader, writer, head = await connect_via(agent.proxy_port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(1 << 20)
        for link in list(server.links):
            assert link.transport is not None
            link.transport.abort()  # the server vanishes without a goodbye

        async def drain() -> None:
            try:
                while await reader.read(1 << 20):
                    pass
            except ConnectionResetError:
                pass  # the agent resets a tunnel whose link died (a FIN would look complete)
            else:
                raise AssertionError("a tunnel cut by a dead link ended with a clean EOF")

        await asyncio.wait_for(drain(), 5)  # ends, never hangs
        writer.close()
        await agent.stop(grace=0)


def test_non_loopback_proxy_address_needs_proxy_users_or_explicit_permission(
    pki: PkiPaths,
) -> None:
    with pytest.raises(ConfigError, match=r"proxy_auth\.users.*allow_open_proxy"):
        Agent(agent_config(pki, 8443, local_proxy_addr="0.0.0.0"))
    with pytest.raises(ConfigError, match="allow_open_proxy"):
        Agent(agent_config(pki, 8443, local_proxy_addr="192.0.2.1", allow_open_proxy=False))
    Agent(agent_config(pki, 8443, local_proxy_addr="0.0.0.0", allow_open_proxy=True))
    users = {"users": [{"username": "alice", "password": "s3cret"}]}
    Agent(agent_config(pki, 8443, local_proxy_addr="0.0.0.0", proxy_auth=users))


def test_missing_server_address_is_explained(pki: PkiPaths) -> None:
    with pytest.raises(ConfigError, match="--server-ip"):
        Agent(agent_config(pki, 8443, server_ip=None))


async def test_http_limits_from_config_reach_the_proxy(pki: PkiPaths, free_port: int) -> None:
    async with running_agent(pki, free_port, http=HttpConfig(max_request_line=1024)) as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
        writer.write(b"GET http://127.0.0.1/" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.1 414")
