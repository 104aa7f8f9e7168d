"""Shared pieces of the agent tests: an in-process agent with a server, curl, a raw SOCKS client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths
from fluidity.config import AgentConfig

from ..integration.stack import tunnel_config

CURL = "/usr/bin/curl"
# A clean environment: no http_proxy / no_proxy / .curlrc from the machine running the tests.
CURL_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


def agent_config(pki: PkiPaths, server_port: int, **overrides: Any) -> AgentConfig:
    """An agent on 127.0.0.1 (ephemeral port) for a server on 127.0.0.1:``server_port``."""
    tunnel = overrides.pop("tunnel", {})
    values: dict[str, Any] = {
        "server_ip": "127.0.0.1",
        "server_port": server_port,
        "local_proxy_port": 0,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key,
        "ca_cert_file": pki.ca_cert,
        "tunnel": tunnel_config(**tunnel),
        "upstream": {"use_environment": False, **overrides.pop("upstream", {})},
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


@dataclass
class CurlResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    def json(self) -> Any:
        return json.loads(self.stdout)


async def curl(*args: str, timeout: float = 30) -> CurlResult:
    """Run curl (``-q``: ignore any .curlrc) without blocking the loop."""
    process = await asyncio.create_subprocess_exec(
        CURL,
        "-q",
        "--max-time",
        str(int(timeout)),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CURL_ENV,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout + 5)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return CurlResult(process.returncode or 0, out, err)


async def socks_exchange(port: int, *messages: bytes, expect: int, eof: bool = False) -> bytes:
    """Send SOCKS5 ``messages`` to 127.0.0.1:``port`` (then EOF if ``eof``); return the first
    ``expect`` bytes back (fewer if the agent closes first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for message in messages:
            writer.write(message)
        if eof:
            writer.write_eof()
        await writer.drain()
        data = b""
        async with asyncio.timeout(10):
            while len(data) < expect:
                chunk = await reader.read(expect - len(data))
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        writer.close()


def connect_request(host: str, port: int) -> bytes:
    """A SOCKS5 CONNECT request for a domain name."""
    name = host.encode()
    return bytes((5, 1, 0, 3, len(name))) + name + port.to_bytes(2, "big")
