"""Socket options of the TLS link on both loops the product runs on.

asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP, and a socket accepted from
``socket.create_server`` has proto 0; uvloop sets it on every TCP transport. Without it, a small
frame (an OPEN after a stream's close) waits for the peer's delayed ACK: 40 ms per new tunnel was
seen on asyncio's loop before the server set the option itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig
from tests.integration.stack import echo_handler, running_server, running_tunnel, tcp_server
from tests.integration.test_agent import running_agent


def _nodelay(transport: object) -> int:
    sock = transport.get_extra_info("socket")  # type: ignore[attr-defined]
    assert sock is not None
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def _assert_both_ends_disable_nagle(pki: PkiPaths) -> None:
    async with running_server(pki) as server, running_tunnel(pki, server.port) as tunnel:
        (server_link,) = server.links
        (agent_link,) = tunnel.links
        assert _nodelay(server_link.transport) == 1
        assert _nodelay(agent_link.transport) == 1


@pytest.mark.stdlib_loop
async def test_both_ends_of_the_link_disable_nagle_on_asyncio(pki: PkiPaths) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")
    await _assert_both_ends_disable_nagle(pki)


async def test_both_ends_of_the_link_disable_nagle_on_uvloop(pki: PkiPaths) -> None:
    await _assert_both_ends_disable_nagle(pki)


async def _assert_target_connections_disable_nagle(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as echo_port,
    ):
        stream = await tunnel.open("127.0.0.1", echo_port)
        await stream.wait_open()
        stream.write(b"ping")
        assert await stream.read() == b"ping"
        (server_link,) = server.links
        (target,) = server_link.targets.values()
        # A small response (a TLS record, an HTTP head) must reach the target at once.
        assert _nodelay(target.transport) == 1
        stream.close()


@pytest.mark.stdlib_loop
async def test_target_connections_disable_nagle_on_asyncio(pki: PkiPaths) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")
    await _assert_target_connections_disable_nagle(pki)


async def test_target_connections_disable_nagle_on_uvloop(pki: PkiPaths) -> None:
    await _assert_target_connections_disable_nagle(pki)


def _accepted_socket_of(client: asyncio.StreamWriter) -> socket.socket:
    """The agent's end of ``client``'s connection, found among this process's descriptors."""
    wanted = client.get_extra_info("sockname")
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        try:
            if sock.family == socket.AF_INET and sock.getpeername() == wanted:
                return sock
        except OSError:
            pass
        sock.close()
    raise AssertionError(f"no socket of this process is connected to {wanted}")


async def _no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal origin: answers each request head with 204."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    writer.close()


async def _assert_client_connections_disable_nagle(pki: PkiPaths) -> None:
    # The agent sets no socket option itself: both loops set TCP_NODELAY on every connection
    # their create_server accepts, and a 200, an answer head or a SOCKS5 reply must not wait
    # for the client's delayed ACK.
    async with (
        running_server(pki, egress=EgressConfig(allow_cidrs=["127.0.0.1/32"])) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(_no_content) as origin_port,
    ):
        assert await agent.tunnel.wait_connected(5), agent.tunnel.last_error
        target = f"127.0.0.1:{origin_port}"
        connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        plain = f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        socks = b"\x05\x01\x00"  # a greeting: version 5, one method, no authentication
        for first, answer in ((connect, b"HTTP/1.1 200"), (plain, b"HTTP/1.1 204"),
                              (socks, b"\x05\x00")):  # fmt: skip
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
            try:
                writer.write(first)
                assert (await asyncio.wait_for(reader.read(64), 5)).startswith(answer)
                with _accepted_socket_of(writer) as accepted:
                    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            finally:
                writer.close()


@pytest.mark.stdlib_loop
async def test_client_connections_disable_nagle_on_asyncio(pki: PkiPaths) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")
    await _assert_client_connections_disable_nagle(pki)


async def test_client_connections_disable_nagle_on_uvloop(pki: PkiPaths) -> None:
    await _assert_client_connections_disable_nagle(pki)
