"""Socket options of the TLS link on both loops the product runs on.

asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP, and a socket accepted from
``socket.create_server`` has proto 0; uvloop sets it on every TCP transport. Without it, a small
frame (an OPEN after a stream's close) waits for the peer's delayed ACK: 40 ms per new tunnel was
seen on asyncio's loop before the server set the option itself.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from fluidity.certs import PkiPaths
from tests.integration.stack import echo_handler, running_server, running_tunnel, tcp_server


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
