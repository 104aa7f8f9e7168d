"""The request relay answers exactly as the task-based session does: a differential test.

The same byte sequences (pipelined requests of many kinds, ending with ``Connection: close``) go
to two proxies over the same tunnel: one whose opener can open streams at once (so connections
are relayed, and handed to a session at the first request the relay does not serve) and one
whose opener cannot (every connection is a session's). Everything the client receives must be
identical, byte for byte, and the origin must have seen the same requests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from fluidity.agent.http_proxy import HttpProxy
from fluidity.agent.tunnel import Tunnel
from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig

from .origins import HttpOrigin
from .stack import running_server, running_tunnel

pytestmark = pytest.mark.timeout(120)

SEQUENCES = 100  # random request sequences per run (fixed seed: the same ones every run)
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"


class SessionOnly:
    """The tunnel as an opener without ``open_now``: the proxy never relays."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    async def open(self, host: str, port: int) -> object:
        return await self._tunnel.open(host, port)


def request(
    target: str, *headers: str, method: str = "GET", body: bytes = b"", version: str = "1.1"
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: h.example", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


def vocabulary(origin: str, refused: str) -> list[bytes]:
    """Requests of every kind the proxy meets, each one complete (head and body).

    Not among them: a request behind an origin's silent close (``?drop=1``). Whether it meets
    a stale upstream depends on when the FIN arrives, for either implementation; the relay and
    the session each have their own tests of the retry.
    """
    url = f"http://{origin}"
    return [
        request(f"{url}/echo/a"),
        request(f"{url}/echo/b?q=1", "X-Custom: yes", "Connection: X-Hop", "X-Hop: no", "TE: x"),
        request(f"{url}/bytes/2000", method="HEAD"),
        request(f"{url}/bytes/70000?framing=chunked"),
        request(f"{url}/bytes/3000?framing=close"),  # the origin closes after it
        request(f"{url}/bytes/5"),
        request(f"{url}/status/204"),
        request(f"{url}/status/304"),
        request(f"{url}/hop"),
        request(f"{url}/echo/d", method="DELETE"),
        request(url, method="OPTIONS"),
        request(f"http://{refused}/"),  # 502, and the connection stays
        request(f"{url}/echo/p", "Content-Length: 11", method="POST", body=b"hello world"),
        request(f"{url}/echo/c", "Transfer-Encoding: chunked", method="POST", body=CHUNKED_BODY),
        request(f"{url}/echo/empty", "Content-Length: 0", method="PUT"),
        request("/not-a-proxy-request"),
        request(f"{url}/echo/v10", version="1.0"),  # the last answer on its connection
    ]


Answer = tuple[bytes, list[bytes], bytes]


def answers(data: bytes, methods: list[bytes]) -> list[Answer]:
    """Split what a client received into (status line, header lines, body) per request, bodies
    de-chunked: where chunk boundaries fall depends on timing, not on the proxy's rules."""
    out: list[Answer] = []
    for method in methods:
        if not data:
            break
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *fields = head.split(b"\r\n")
        names = {line.split(b":", 1)[0].lower(): line for line in fields}
        status = int(status_line.split(b" ")[1])
        body = b""
        if method == b"HEAD" or status in (204, 304):
            pass
        elif b"content-length" in names:
            size = int(names[b"content-length"].split(b":", 1)[1])
            body, data = data[:size], data[size:]
        elif b"transfer-encoding" in names:
            pieces = []
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    _, _, data = data.partition(b"\r\n")  # no trailer fields are sent
                    break
                pieces.append(data[:size])
                data = data[size + 2 :]
            body = b"".join(pieces)
        else:
            body, data = data, b""  # delimited by the close
        out.append((status_line, fields, body))
    assert not data, f"unparsed bytes after the answers: {data[:80]!r}"
    return out


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` in one write, then read everything until the proxy closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(-1), 20)
    finally:
        writer.close()


@pytest.fixture
async def proxies(pki: PkiPaths) -> AsyncIterator[tuple[HttpProxy, HttpProxy, HttpOrigin, str]]:
    async with (
        running_server(pki, egress=EgressConfig(allow_cidrs=["127.0.0.1/32"])) as server,
        running_tunnel(pki, server.port) as tunnel,
        HttpOrigin() as origin,
    ):
        relaying = HttpProxy(tunnel)
        session_only = HttpProxy(SessionOnly(tunnel))  # type: ignore[arg-type]
        await relaying.serve("127.0.0.1", 0)
        await session_only.serve("127.0.0.1", 0)
        # A port nothing listens on, for the refused requests.
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        refused = f"127.0.0.1:{probe.sockets[0].getsockname()[1]}"
        probe.close()
        await probe.wait_closed()
        try:
            yield relaying, session_only, origin, refused
        finally:
            await relaying.aclose()
            await session_only.aclose()


async def test_random_request_sequences_get_identical_answers(
    proxies: tuple[HttpProxy, HttpProxy, HttpOrigin, str],
) -> None:
    relaying, session_only, origin, refused = proxies
    relay_port, session_port = relaying.addresses[0][1], session_only.addresses[0][1]
    words = vocabulary(origin.authority, refused)
    last = request(f"http://{origin.authority}/echo/end", "Connection: close")
    rng = random.Random(20261207)
    compared = 0
    for n in range(SEQUENCES):
        sequence = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        methods = [r.split(b" ", 1)[0] for r in [*sequence, last]]
        data = b"".join(sequence) + last
        origin.requests.clear()
        relayed = answers(await exchange(relay_port, data), methods)
        seen_by_origin = [(r.method, r.target, r.headers) for r in origin.requests]
        origin.requests.clear()
        served = answers(await exchange(session_port, data), methods)
        assert relayed == served, f"sequence {n} differs: {sequence!r}"
        assert seen_by_origin == [(r.method, r.target, r.headers) for r in origin.requests]
        compared += len(relayed)
    assert relaying.requests > 0.5 * compared  # counted by whoever served them
    assert session_only.task_less_connections == 0


async def test_the_relaying_proxy_relays(
    proxies: tuple[HttpProxy, HttpProxy, HttpOrigin, str],
) -> None:
    """Guards the differential test: one proxy relays, the other never does."""
    relaying, session_only, origin, _ = proxies
    get = request(f"http://{origin.authority}/echo/x")
    for proxy, relayed in ((relaying, 1), (session_only, 0)):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
        writer.write(get)
        await reader.readuntil(b"}")  # the end of the JSON body
        assert proxy.task_less_connections == relayed
        assert proxy.active_connections == 1
        writer.close()
