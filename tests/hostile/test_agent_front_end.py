"""Malformed and hostile input against the agent's HTTP proxy, through the real tunnel.

Every case gets the right 4xx or a clean close, costs nothing afterwards (no client connection,
stream or target connection left behind), and a normal request right after it succeeds.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths
from fluidity.config import HttpConfig
from fluidity.server.listener import Server
from tests.integration.origins import HttpOrigin, pattern_chunks, pattern_sha256
from tests.integration.stack import running_server
from tests.integration.test_agent import running_agent

from ..faults.support import fetch

HEADER_READ_TIMEOUT = 0.5


@dataclass
class Stack:
    origin: HttpOrigin
    server: Server
    agent: Agent


@pytest.fixture
async def stack(pki: PkiPaths) -> AsyncIterator[Stack]:
    http = HttpConfig(header_read_timeout=HEADER_READ_TIMEOUT, idle_timeout=5)
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, http=http) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        yield Stack(origin, server, agent)


async def _send(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data``, then read until the proxy closes (bounded: a hang fails the test)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass  # a reset after the answer is a clean enough close for garbage
    finally:
        writer.close()
    return received


async def _still_serves(stack: Stack) -> None:
    result = await fetch(stack.agent.proxy_port, stack.origin.url("/bytes/100000"))
    assert result.ok and result.sha256 == pattern_sha256(100000), result
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    # Nothing left behind: the proxy's client connections and the server's streams go to zero.
    while stack.agent.proxy.active_connections or stack.server.stats.active_streams:
        assert loop.time() < deadline, (
            stack.agent.proxy.active_connections,
            stack.server.stats.active_streams,
        )
        await asyncio.sleep(0.02)


def _head(extra: bytes, method: bytes = b"GET", target: bytes = b"http://a.test/") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: a.test\r\n" + extra + b"\r\n"


CASES: dict[str, tuple[bytes, int | None]] = {
    # (bytes sent, expected status; None: a clean close without an answer is acceptable too)
    "binary-garbage": (random.Random(7).randbytes(4096) + b"\r\n\r\n", 400),
    "tls-hello-to-http-port": (bytes.fromhex("160301020001") + os.urandom(300), 400),
    "nul-in-header": (_head(b"X-A: a\x00b\r\n"), 400),
    "header-without-colon": (_head(b"NoColonHere\r\n"), 400),
    "space-before-colon": (_head(b"Transfer-Encoding : chunked\r\n", b"POST"), 400),
    "oversized-request-line": (_head(b"", target=b"http://a.test/" + b"a" * 20000), 414),
    "oversized-header": (_head(b"X-Big: " + b"v" * 100_000 + b"\r\n"), 431),
    "ten-thousand-headers": (_head(b"".join(b"X-%d: v\r\n" % i for i in range(10_000))), 431),
    "cl-and-te": (
        _head(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"POST")
        + b"0\r\n\r\nGET http://a.test/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
    ),
    "te-and-cl": (
        _head(b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n", b"POST")
        + b"0\r\n\r\nGET http://a.test/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
    ),
    "two-content-lengths": (_head(b"Content-Length: 3\r\nContent-Length: 40\r\n", b"POST"), 400),
    "te-not-chunked-last": (_head(b"Transfer-Encoding: chunked, identity\r\n", b"POST"), 400),
    "te-obfuscated": (_head(b"Transfer-Encoding: xchunked\r\n", b"POST"), 400),
    "negative-length": (_head(b"Content-Length: -5\r\n", b"POST"), 400),
    "overflowing-length": (_head(b"Content-Length: 1" + b"9" * 40 + b"\r\n", b"POST"), 400),
    "connect-no-port": (b"CONNECT a.test HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    "connect-port-zero": (b"CONNECT a.test:0 HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    "connect-port-overflow": (b"CONNECT a.test:99999 HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    "connect-junk-host": (b"CONNECT a\x01b:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "connect-userinfo": (b"CONNECT u:p@a.test:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "http-0.9": (b"GET /\r\n\r\n", 400),
    "bad-version": (
        b"GET http://127.0.0.1:9/ HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n",
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_malformed_request_gets_4xx_or_clean_close_and_service_continues(
    stack: Stack, case: str
) -> None:
    data, status = CASES[case]
    reply = await _send(stack.agent.proxy_port, data)
    if status is None:
        assert reply == b"" or reply.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), reply[:200]
    else:
        assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:300]
        assert b"connection: close" in reply.lower()
    assert b"smuggled" not in b"".join(r.target.encode() for r in stack.origin.requests)
    await _still_serves(stack)


async def test_bad_chunk_sizes_reach_no_origin_as_a_second_request(stack: Stack) -> None:
    for chunk in (b"-1", b"fffffffffffffffffffffffff", b"zz", b"5 5"):
        head = _head(b"Transfer-Encoding: chunked\r\n", b"POST", stack.origin.url("/echo").encode())
        reply = await _send(stack.agent.proxy_port, head + chunk + b"\r\nhello\r\n0\r\n\r\n")
        # The head may already be forwarded, so the answer is a 4xx/5xx or a closed connection.
        assert reply == b"" or reply.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), reply[:200]
    assert all(r.target == "/echo" for r in stack.origin.requests)
    await _still_serves(stack)


async def test_slowloris_header_block_is_cut_off_by_the_header_read_timeout(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port)
    writer.write(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n")
    reply = b""
    async with asyncio.timeout(HEADER_READ_TIMEOUT + 10):
        for index in range(10_000):  # one header line every 50 ms, never the blank line
            writer.write(b"X-Slow-%d: v\r\n" % index)
            try:
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof() or len(reader._buffer):  # the proxy answered
                break
            await asyncio.sleep(0.05)
        reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    await _still_serves(stack)


async def test_many_silent_connections_are_closed_and_cost_nothing(stack: Stack) -> None:
    connections = [
        await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port) for _ in range(200)
    ]
    async with asyncio.timeout(HEADER_READ_TIMEOUT + 10):
        for reader, _ in connections:
            assert await reader.read() == b""  # closed without an answer: nothing was asked
    for _, writer in connections:
        writer.close()
    await _still_serves(stack)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_vanishing_mid_upload_frees_the_stream_and_the_target(
    stack: Stack, how: str
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port)
    url = stack.origin.url("/echo").encode()
    writer.write(_head(b"Content-Length: 10485760\r\n", b"POST", url) + b"x" * (1 << 20))
    await writer.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while stack.server.stats.active_streams == 0:  # the upload is under way over the tunnel
        assert loop.time() < deadline
        await asyncio.sleep(0.02)
    if how == "reset":
        writer.transport.abort()
    else:
        writer.close()
    await _still_serves(stack)


async def test_client_vanishing_mid_connect_tunnel_frees_the_stream(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port)
    target = stack.origin.authority
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /bytes/100000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readexactly(1 << 20)
    writer.transport.abort()
    await _still_serves(stack)


# -- SOCKS5 on the same port (first byte 0x05) ---------------------------------------------------


def pattern_chunks_bytes(size: int) -> bytes:
    return b"".join(pattern_chunks(size))


GREET = b"\x05\x01\x00"  # SOCKS5, one method: no authentication
LOCAL = bytes([127, 0, 0, 1])


def _socks_request(command: int, address_type: int, address: bytes, port: int) -> bytes:
    return bytes([5, command, 0, address_type]) + address + port.to_bytes(2, "big")


SOCKS_CASES: dict[str, tuple[bytes, bytes]] = {
    # (bytes sent, the start of the expected answer; the connection must then be closed)
    "no-methods": (b"\x05\x00", b"\x05\xff"),
    "no-acceptable-method": (b"\x05\x01\x80", b"\x05\xff"),
    "auth-garbage": (b"\x05\x01\x02\x09garbage", b"\x05\x02\x01\x01"),
    "bad-request-version": (GREET + b"\x04\x01\x00\x01" + LOCAL + b"\x00\x50", b"\x05\x00\x05\x01"),
    "bind": (GREET + _socks_request(2, 1, LOCAL, 80), b"\x05\x00\x05\x07"),
    "udp-associate": (GREET + _socks_request(3, 1, LOCAL, 80), b"\x05\x00\x05\x07"),
    "unknown-command": (GREET + _socks_request(9, 1, LOCAL, 80), b"\x05\x00\x05\x07"),
    "unknown-address-type": (GREET + b"\x05\x01\x00\x09", b"\x05\x00\x05\x08"),
    "empty-domain": (GREET + _socks_request(1, 3, b"\x00", 80), b"\x05\x00\x05\x01"),
    "unprintable-domain": (GREET + _socks_request(1, 3, b"\x03a\x01b", 80), b"\x05\x00\x05\x01"),
    "port-zero": (GREET + _socks_request(1, 1, LOCAL, 0), b"\x05\x00\x05\x01"),
    "refused-target": (GREET + _socks_request(1, 1, LOCAL, 9), b"\x05\x00\x05\x05"),
    "truncated-request": (GREET + b"\x05\x01\x00\x03\x10abc", b"\x05\x00"),
    "garbage-after-version": (b"\x05" + random.Random(5).randbytes(5000), b""),
}


@pytest.mark.parametrize("case", list(SOCKS_CASES))
async def test_malformed_socks5_gets_an_error_reply_or_clean_close_and_service_continues(
    stack: Stack, case: str
) -> None:
    data, expected = SOCKS_CASES[case]
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port)
    writer.write(data)
    writer.write_eof()  # nothing more is coming: a truncated request must not wait forever
    received = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    writer.close()
    assert received.startswith(expected), (received, expected)
    if expected.startswith(b"\x05\x00\x05"):  # a request reply: one 10-byte reply, nothing more
        assert len(received) == 2 + 10, received
    await _still_serves(stack)


async def test_socks5_connect_carries_http_after_the_hostile_cases(stack: Stack) -> None:
    port = stack.origin.port
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.agent.proxy_port)
    writer.write(GREET + _socks_request(1, 3, b"\x09127.0.0.1", port))
    assert await reader.readexactly(2 + 10) == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
    writer.write(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == pattern_chunks_bytes(1000)
    await _still_serves(stack)
