"""In-process building blocks for integration tests: a server, a tunnel, simple targets."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fluidity.agent.tunnel import Tunnel
from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig, ServerConfig, TunnelConfig
from fluidity.server.listener import Server
from fluidity.tls import client_context, server_context

LOOPBACK_EGRESS = EgressConfig(allow_cidrs=["127.0.0.0/8", "::1/128"])


def server_config(**overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": 0,
        "egress": LOOPBACK_EGRESS,
        "dial_timeout": 3.0,
    }
    values.update(overrides)
    return ServerConfig(**values)


@asynccontextmanager
async def running_server(pki: PkiPaths, **overrides: Any) -> AsyncIterator[Server]:
    config = server_config(**overrides)
    server = Server(config, server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(0)


def tunnel_config(**overrides: Any) -> TunnelConfig:
    values: dict[str, Any] = {"reconnect_initial": 0.05, "reconnect_max": 0.5, "connect_timeout": 3}
    values.update(overrides)
    return TunnelConfig(**values)


@asynccontextmanager
async def running_tunnel(
    pki: PkiPaths,
    port: int,
    *,
    server_name: str = "fluidity-server",
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    wait: bool = True,
    **overrides: Any,
) -> AsyncIterator[Tunnel]:
    context = client_context(cert or pki.client_cert, key or pki.client_key, ca or pki.ca_cert)
    tunnel = Tunnel("127.0.0.1", port, server_name, context, tunnel_config(**overrides))
    tunnel.start()
    try:
        if wait:
            assert await tunnel.wait_connected(5), f"no link: {tunnel.last_error}"
        yield tunnel
    finally:
        await tunnel.stop()


@asynccontextmanager
async def tcp_server(handler: Any) -> AsyncIterator[int]:
    """Run ``handler(reader, writer)`` on 127.0.0.1; yield the port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo bytes; on EOF, half-close back."""
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def source_handler(size: int) -> Any:
    """A handler that sends ``size`` deterministic bytes, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            block = bytes(range(256)) * 256
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                writer.write(chunk)
                left -= len(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handler


def expected_source_digest(size: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = block[: min(left, len(block))]
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()
