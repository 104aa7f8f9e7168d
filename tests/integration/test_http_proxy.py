"""The HTTP proxy front end, driven by real curl and the websockets client, over DirectOpener
and over the real tunnel (agent link + server over mutual TLS).

Everything runs on 127.0.0.1 with ephemeral ports: the proxy in the test's event loop, curl as a
subprocess (so the loop keeps serving), origins from :mod:`tests.integration.origins`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fluidity.agent.direct import DirectOpener, failure_for_oserror
from fluidity.agent.http_messages import LocalRequest, LocalResponse
from fluidity.agent.http_proxy import HttpProxy, ProxyLimits
from fluidity.agent.streams import OpenFailure, StreamOpener, StreamOpenError
from fluidity.certs import PkiPaths
from tests.integration.origins import (
    HalfCloseOrigin,
    HttpOrigin,
    OriginCertificates,
    WebSocketEchoOrigin,
    make_certificates,
    pattern_sha256,
    write_pattern_file,
)

from .stack import running_server, running_tunnel

pytestmark = pytest.mark.timeout(60)

CURL = "/usr/bin/curl"
# A clean environment: no http_proxy / no_proxy / .curlrc from the machine running the tests.
CURL_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
MIB = 1024 * 1024
BIG = 64 * MIB


# -- fixtures and helpers ----------------------------------------------------------------------


ProxyFactory = Callable[..., Awaitable[HttpProxy]]


@pytest.fixture(params=["direct", "tunnel"])
async def default_opener(
    request: pytest.FixtureRequest, pki: PkiPaths
) -> AsyncIterator[StreamOpener]:
    """Every proxy test runs twice: straight to the origin, and over the real mTLS tunnel."""
    if request.param == "direct":
        yield DirectOpener(connect_timeout=5)
        return
    async with running_server(pki) as server, running_tunnel(pki, server.port) as tunnel:
        yield tunnel


@pytest.fixture
async def make_proxy(default_opener: StreamOpener) -> AsyncIterator[ProxyFactory]:
    proxies: list[HttpProxy] = []

    async def factory(
        opener: StreamOpener | None = None, limits: ProxyLimits | None = None, **kwargs: Any
    ) -> HttpProxy:
        proxy = HttpProxy(opener or default_opener, limits, **kwargs)
        await proxy.serve("127.0.0.1", 0)
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        await proxy.aclose()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> HttpProxy:
    return await make_proxy()


@pytest.fixture
async def origin() -> AsyncIterator[HttpOrigin]:
    async with HttpOrigin() as server:
        yield server


@pytest.fixture
async def origin2() -> AsyncIterator[HttpOrigin]:
    async with HttpOrigin() as server:
        yield server


@pytest.fixture
def certs(tmp_path: Path) -> OriginCertificates:
    return make_certificates(tmp_path)


def port_of(proxy: HttpProxy) -> int:
    return int(proxy.addresses[0][1])


def via(proxy: HttpProxy) -> list[str]:
    return ["-x", f"http://127.0.0.1:{port_of(proxy)}"]


def discard(urls: list[str]) -> list[str]:
    """curl arguments fetching ``urls`` on one connection, each body sent to /dev/null."""
    return [arg for url in urls for arg in ("-o", "/dev/null", url)]


@dataclass
class CurlResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.stdout)


async def curl(*args: str, stdin: bytes | None = None, timeout: float = 45) -> CurlResult:
    """Run curl (``-q`` first: ignore any .curlrc) and wait for it without blocking the loop."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        CURL,
        "-q",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CURL_ENV,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return CurlResult(process.returncode or 0, out, err, time.monotonic() - started)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    """A hand-driven client: arbitrary bytes out; well-formed requests and replies via h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, proxy: HttpProxy) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        return cls(reader, writer)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.writer.close()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_to_eof(self, timeout: float = 5) -> bytes:
        """Everything until the proxy closes; fails the test if it does not close in time."""
        chunks = []
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(65536):
                chunks.append(data)
        return b"".join(chunks)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str | None = None,
    ) -> Answer:
        """Send one request (Host from the URL unless given) and read the whole answer."""
        if host is None:
            host = target.split("/")[2] if "://" in target else "proxy.test"
        all_headers = [("Host", host), *(headers or [])]
        if body:
            all_headers.append(("Content-Length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        await self.send_raw(out)
        return await self.read_answer()

    async def read_answer(self, timeout: float = 10) -> Answer:
        status, headers, chunks = 0, {}, []
        async with asyncio.timeout(timeout):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(65536))
                elif type(event) is h11.Response:
                    status = event.status_code
                    headers = {n.decode(): v.decode() for n, v in event.headers}
                elif type(event) is h11.Data:
                    chunks.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Answer(status, headers, b"".join(chunks))


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


# -- plain HTTP requests -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_every_method_reaches_the_origin_in_origin_form(
    proxy: HttpProxy, origin: HttpOrigin, method: str
) -> None:
    body = [] if method in ("GET", "DELETE", "OPTIONS") else ["--data-binary", "payload"]
    result = await curl(*via(proxy), "-sS", "-X", method, *body, origin.url("/echo/a?b=c"))
    assert result.returncode == 0, result.stderr
    echo = result.json()
    assert echo["method"] == method
    assert echo["target"] == "/echo/a?b=c"
    hosts = [v for n, v in echo["headers"] if n.lower() == "host"]
    assert hosts == [origin.authority]
    if body:
        assert echo["body_sha256"] == hashlib.sha256(b"payload").hexdigest()


async def test_host_header_comes_from_the_url_and_hop_by_hop_headers_are_removed(
    proxy: HttpProxy, origin: HttpOrigin
) -> None:
    async with await RawClient.connect(proxy) as client:
        headers = [
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "dropped"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("X-End-To-End", "kept"),
        ]
        # The client's Host is wrong on purpose: the proxy must use the URL's authority.
        answer = await client.request(
            "GET", origin.url("/echo"), headers=headers, host="wrong.example"
        )
        assert answer.status == 200
        sent = {n.lower(): v for n, v in json.loads(answer.body)["headers"]}
        assert sent["host"] == origin.authority
        assert sent["x-end-to-end"] == "kept"
        for name in ("connection", "x-hop", "proxy-connection", "proxy-authorization", "te"):
            assert name not in sent
        assert "keep-alive" not in sent

        hop = await client.request("GET", origin.url("/hop"))
        assert hop.status == 200 and hop.body == b"hop"
        assert hop.headers["x-kept"] == "yes"
        for name in ("x-internal", "keep-alive", "proxy-authenticate"):
            assert name not in hop.headers
        assert hop.headers.get("connection") is None


async def test_64_mib_download_is_streamed_intact(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path
) -> None:
    out = tmp_path / "download"
    result = await curl(*via(proxy), "-sS", "-o", str(out), origin.url(f"/bytes/{BIG}"))
    assert result.returncode == 0, result.stderr
    assert file_sha256(out) == pattern_sha256(BIG)


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_unknown_length_responses_are_rechunked_and_the_client_connection_kept(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path, framing: str
) -> None:
    size = 3 * MIB + 17
    out = tmp_path / "body"
    result = await curl(
        *via(proxy), "-sS", "-o", str(out), "-w", "%{num_connects}\n",
        origin.url(f"/bytes/{size}?framing={framing}"),
        "--next", *via(proxy), "-sS", "-o", "/dev/null", "-w", "%{num_connects}\n",
        origin.url("/echo"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert file_sha256(out) == pattern_sha256(size)
    lines = result.stdout.decode().splitlines()
    assert lines == ["1", "0"]  # the second request reused the connection
    assert proxy.total_connections == 1


async def test_64_mib_upload_is_streamed_intact(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path
) -> None:
    path = tmp_path / "upload"
    digest = write_pattern_file(path, BIG)
    result = await curl(*via(proxy), "-sS", "-T", str(path), origin.url("/upload"))
    assert result.returncode == 0, result.stderr
    echo = result.json()
    assert (echo["method"], echo["body_length"], echo["body_sha256"]) == ("PUT", BIG, digest)


async def test_chunked_upload_is_streamed_chunked(proxy: HttpProxy, origin: HttpOrigin) -> None:
    data = os.urandom(5 * MIB + 3)
    result = await curl(
        *via(proxy), "-sS", "-H", "Transfer-Encoding: chunked", "-T", "-", origin.url("/upload"),
        stdin=data,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    echo = result.json()
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()
    sent = {n.lower(): v for n, v in echo["headers"]}
    assert sent["transfer-encoding"] == "chunked"
    assert "content-length" not in sent


async def test_expect_100_continue_is_forwarded_and_the_100_relayed(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path
) -> None:
    path = tmp_path / "body"
    digest = write_pattern_file(path, 300_000)
    result = await curl(
        *via(proxy), "-sS", "-v", "-H", "Expect: 100-continue", "--expect100-timeout", "20",
        "--data-binary", f"@{path}", origin.url("/upload"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"< HTTP/1.1 100" in result.stderr
    assert result.elapsed < 10  # curl did not sit out its 20 s expect timeout
    assert origin.continues_sent == 1
    assert result.json()["body_sha256"] == digest


@pytest.mark.parametrize(
    ("first", "expected"),
    [(["-I", "/bytes/1000"], "200"), (["/status/204"], "204"), (["/status/304"], "304")],
    ids=["HEAD", "204", "304"],
)
async def test_bodiless_responses_leave_the_connection_usable(
    proxy: HttpProxy, origin: HttpOrigin, first: list[str], expected: str
) -> None:
    *flags, path = first
    fmt = "%{http_code} %{num_connects} %{size_download}\n"
    result = await curl(
        *via(proxy), "-sS", *flags, "-o", "/dev/null", "-w", fmt, origin.url(path),
        "--next", *via(proxy), "-sS", "-o", "/dev/null", "-w", fmt, origin.url("/echo"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first_line, second_line = result.stdout.decode().splitlines()
    assert first_line == f"{expected} 1 0"  # new connection, no body
    assert second_line.split()[:2] == ["200", "0"]  # same connection
    assert proxy.total_connections == 1
    assert origin.connections == 1  # the upstream stream was reused too
    if flags == ["-I"]:
        assert origin.requests[0].method == "HEAD"


async def test_one_client_connection_reaches_two_origins(
    proxy: HttpProxy, origin: HttpOrigin, origin2: HttpOrigin
) -> None:
    urls = [origin.url("/echo/1"), origin2.url("/echo/2"), origin.url("/echo/3")]
    result = await curl(*via(proxy), "-sS", "-w", "%{http_code}\n", *discard(urls))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["200", "200", "200"]
    assert proxy.total_connections == 1
    assert proxy.requests == 3
    assert [r.target for r in origin.requests] == ["/echo/1", "/echo/3"]
    assert [r.target for r in origin2.requests] == ["/echo/2"]


async def test_stale_upstream_is_replaced_transparently(
    proxy: HttpProxy, origin: HttpOrigin
) -> None:
    # The origin closes after the first answer without saying so; the proxy's reuse attempt
    # finds the stream dead and replays the GET on a fresh one.
    urls = [origin.url("/echo?drop=1"), origin.url("/echo/again")]
    result = await curl(*via(proxy), "-sS", "-w", "%{http_code}\n", *discard(urls))
    assert result.stdout.decode().split() == ["200", "200"], result.stderr
    assert origin.connections == 2


async def test_early_response_to_an_upload_is_relayed_and_the_connection_closed(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path
) -> None:
    path = tmp_path / "upload"
    write_pattern_file(path, 8 * MIB)
    result = await curl(*via(proxy), "-sS", "-w", "%{http_code}", "-T", str(path),
                        origin.url("/reject"))  # fmt: skip
    assert result.stdout.endswith(b"413"), result.stderr
    assert result.elapsed < 10


async def test_http_1_0_client_gets_a_close_delimited_body(
    proxy: HttpProxy, origin: HttpOrigin, tmp_path: Path
) -> None:
    out = tmp_path / "body"
    size = 2 * MIB + 1
    result = await curl(*via(proxy), "-sS", "--http1.0", "-o", str(out),
                        origin.url(f"/bytes/{size}?framing=chunked"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert file_sha256(out) == pattern_sha256(size)


async def test_pipelined_requests_are_answered_in_order(
    proxy: HttpProxy, origin: HttpOrigin, origin2: HttpOrigin
) -> None:
    async with await RawClient.connect(proxy) as client:
        first = h11.Request(method="GET", target=origin.url("/echo/1"), headers=[("Host", "a")])
        second = h11.Request(method="GET", target=origin2.url("/echo/2"), headers=[("Host", "b")])
        # h11 will not pipeline, so the second request is serialised by a scratch connection.
        scratch = h11.Connection(h11.CLIENT)
        wire = client.conn.send(first) + client.conn.send(h11.EndOfMessage())
        wire += scratch.send(second) + scratch.send(h11.EndOfMessage())
        await client.send_raw(wire)
        one = await client.read_answer()
        client.conn.send(second)  # advance the parser's state; the bytes already went out
        client.conn.send(h11.EndOfMessage())
        two = await client.read_answer()
    assert json.loads(one.body)["target"] == "/echo/1"
    assert json.loads(two.body)["target"] == "/echo/2"


@pytest.mark.parametrize(
    ("script", "text"),
    [
        ([b"HTTP/1.1 abc\r\n\r\n"], b"invalid response from origin.test:80"),
        ([b""], b"origin.test:80 closed the connection, no response"),
        ([StreamOpenError(OpenFailure.RESET, "reset by peer")], b"connection reset"),
    ],
    ids=["garbage", "eof", "reset"],
)
async def test_origin_failing_before_its_response_gets_502(
    make_proxy: ProxyFactory, script: list[bytes | StreamOpenError], text: bytes
) -> None:
    class OneStream:
        async def open(self, host: str, port: int) -> Any:
            return ScriptedStream(list(script), open_error=False)

    proxy = await make_proxy(OneStream())
    async with await RawClient.connect(proxy) as client:
        answer = await client.request("GET", "http://origin.test/")
    assert answer.status == 502
    assert text in answer.body


# -- CONNECT -----------------------------------------------------------------------------------


async def test_connect_carries_64_mib_of_tls(
    proxy: HttpProxy, certs: OriginCertificates, tmp_path: Path
) -> None:
    async with HttpOrigin(certs.server_context()) as tls_origin:
        out = tmp_path / "download"
        result = await curl(
            *via(proxy), "-sS", "--cacert", str(certs.ca_path), "-o", str(out),
            tls_origin.url(f"/bytes/{BIG}"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert file_sha256(out) == pattern_sha256(BIG)


async def test_connect_honours_half_close_and_forwards_early_bytes(proxy: HttpProxy) -> None:
    async with HalfCloseOrigin() as target, await RawClient.connect(proxy) as client:
        payload = os.urandom(MIB)
        head = f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n"
        # The first payload bytes ride in the same packet as the CONNECT head.
        await client.send_raw(head.encode() + payload[:1000])
        established = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert established == b"HTTP/1.1 200 Connection established\r\n\r\n"
        await client.send_raw(payload[1000:])
        client.writer.write_eof()  # our half-close must reach the target...
        reply = await client.read_to_eof()  # ...and its answer must still come back, then EOF
        assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


# -- WebSocket ---------------------------------------------------------------------------------


class AbsoluteFormConnection(ClientConnection):
    """Sends the opening handshake as ``GET http://host/path``, the way a browser asks a proxy
    for ws://. (websockets' own ``proxy=`` support always uses CONNECT.)"""

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        make_request = self.protocol.connect

        def absolute_form() -> Any:
            request = make_request()
            request.path = f"http://{request.headers['Host']}{request.path}"
            return request

        self.protocol.connect = absolute_form  # type: ignore[method-assign]
        await super().handshake(*args, **kwargs)


async def _exercise_websocket(ws: ClientConnection) -> None:
    count = 1000

    async def sender() -> None:
        for i in range(count):
            await ws.send(f"message {i}")

    async def receiver() -> list[str]:
        return [str(await ws.recv()) for _ in range(count)]

    _, received = await asyncio.gather(sender(), receiver())
    assert received == [f"message {i}" for i in range(count)]
    big = os.urandom(MIB)
    await ws.send(big)
    assert await ws.recv() == big


async def test_websocket_over_absolute_form_upgrade(proxy: HttpProxy) -> None:
    async with WebSocketEchoOrigin() as echo:
        async with connect(
            echo.uri("/chat"), proxy=None, host="127.0.0.1", port=port_of(proxy),
            create_connection=AbsoluteFormConnection, max_size=4 * MIB, compression=None,
        ) as ws:  # fmt: skip
            await _exercise_websocket(ws)
            await ws.close(4001, "client done")
        assert await asyncio.wait_for(echo.wait_for_close(1), 5) == [(4001, "client done")]

        async with connect(
            echo.uri("/"), proxy=None, host="127.0.0.1", port=port_of(proxy),
            create_connection=AbsoluteFormConnection,
        ) as ws:  # fmt: skip
            await ws.send("close 4002 server done")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "server done")
    assert proxy.requests == 2


async def test_secure_websocket_through_connect(
    proxy: HttpProxy, certs: OriginCertificates
) -> None:
    async with WebSocketEchoOrigin(certs.server_context()) as echo:
        async with connect(
            echo.uri("/"), proxy=f"http://127.0.0.1:{port_of(proxy)}",
            ssl=certs.client_context(), max_size=4 * MIB, compression=None,
        ) as ws:  # fmt: skip
            await _exercise_websocket(ws)
            await ws.close(4001, "bye")
        assert await asyncio.wait_for(echo.wait_for_close(1), 5) == [(4001, "bye")]


# -- failures reaching the target --------------------------------------------------------------


async def test_closed_port_gives_502_quickly_and_logs_only_the_target(
    proxy: HttpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity.agent.http")
    port = closed_port()
    url = f"http://127.0.0.1:{port}/secret/path?token=hunter2"
    result = await curl(*via(proxy), "-sS", "-w", "%{http_code}", url)
    body, status = result.stdout[:-3].decode(), result.stdout[-3:]
    assert status == b"502"
    # Over the tunnel the server's own detail follows in parentheses.
    assert body.startswith(f"fluidity: cannot reach 127.0.0.1:{port}: connection refused")
    assert body.endswith("\n") and body.count("\n") == 1
    assert result.elapsed < 5
    assert proxy.open_failures == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "fluidity.agent.http"]
    assert lines == [f"http.open_failed target=127.0.0.1:{port} reason=refused"]
    assert "hunter2" not in caplog.text and "secret" not in caplog.text


async def test_unknown_host_gives_502_naming_dns(proxy: HttpProxy) -> None:
    result = await curl(*via(proxy), "-sS", "-w", "%{http_code}", "http://nosuch.invalid/")
    body, status = result.stdout[:-3].decode(), result.stdout[-3:]
    assert status == b"502"
    assert body.startswith("fluidity: cannot reach nosuch.invalid:80: DNS lookup failed")


class FailingOpener:
    """Fails every open with ``failure``, either at ``open`` or at ``wait_open``."""

    def __init__(self, failure: OpenFailure, where: str) -> None:
        self.failure = failure
        self.where = where

    async def open(self, host: str, port: int) -> Any:
        if self.where == "open":
            raise StreamOpenError(self.failure, "simulated")
        return ScriptedStream([StreamOpenError(self.failure, "simulated")])


class ScriptedStream:
    """A stream that opens (or fails), then plays ``script``: bytes to return, or an error."""

    def __init__(self, script: list[bytes | StreamOpenError], open_error: bool = True) -> None:
        self.script = script
        self.written = bytearray()
        self.closed = False
        self.open_error = open_error

    async def wait_open(self) -> None:
        if self.open_error and self.script and isinstance(self.script[0], StreamOpenError):
            raise self.script[0]

    async def read(self) -> bytes:
        item = self.script.pop(0) if self.script else b""
        if isinstance(item, StreamOpenError):
            raise item
        return item

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (OpenFailure.DENIED, 403),
        (OpenFailure.TIMEOUT, 504),
        (OpenFailure.TUNNEL_DOWN, 503),
        (OpenFailure.LIMIT, 503),
        (OpenFailure.REFUSED, 502),
        (OpenFailure.DNS, 502),
        (OpenFailure.UNREACHABLE, 502),
        (OpenFailure.RESET, 502),
        (OpenFailure.LINK_LOST, 502),
        (OpenFailure.ERROR, 502),
    ],
)
@pytest.mark.parametrize("where", ["open", "wait_open"])
async def test_open_failures_map_to_statuses_and_keep_the_connection(
    make_proxy: ProxyFactory, failure: OpenFailure, status: int, where: str
) -> None:
    proxy = await make_proxy(FailingOpener(failure, where))
    async with await RawClient.connect(proxy) as client:
        for _ in range(2):  # the connection survives a failed request
            answer = await client.request("GET", "http://target.test:8000/x?q=1")
            assert answer.status == status
            assert answer.headers["content-type"].startswith("text/plain")
            assert answer.body.startswith(b"fluidity: cannot reach target.test:8000: ")
            assert answer.body.endswith(b"\n") and answer.body.count(b"\n") == 1
    assert proxy.open_failures == 2


async def test_connect_failure_is_answered_and_closed(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(FailingOpener(OpenFailure.DENIED, "wait_open"))
    async with await RawClient.connect(proxy) as client:
        await client.send_raw(b"CONNECT internal.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await client.read_to_eof()
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"connection: close" in reply.lower()
    assert reply.endswith(
        b"fluidity: cannot reach internal.test:443: denied by the server's "
        b"egress policy (simulated)\n"
    )


async def test_stream_dying_after_the_response_head_closes_the_client(
    make_proxy: ProxyFactory,
) -> None:
    stream = ScriptedStream(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial",
            StreamOpenError(OpenFailure.LINK_LOST, "link went away"),
        ],
        open_error=False,
    )

    class OneStream:
        async def open(self, host: str, port: int) -> Any:
            return stream

    proxy = await make_proxy(OneStream())
    async with await RawClient.connect(proxy) as client:
        await client.send_raw(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        reply = await client.read_to_eof()  # must not hang
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"partial")
    assert stream.closed


# -- bad requests ------------------------------------------------------------------------------


async def _refused(proxy: HttpProxy, data: bytes) -> bytes:
    async with await RawClient.connect(proxy) as client:
        await client.send_raw(data)
        return await client.read_to_eof()


async def test_garbage_gets_400_and_the_proxy_keeps_serving(
    proxy: HttpProxy, origin: HttpOrigin
) -> None:
    reply = await _refused(proxy, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    result = await curl(*via(proxy), "-sS", origin.url("/echo"))
    assert result.returncode == 0 and result.json()["method"] == "GET"
    assert proxy.active_connections == 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET http://a.test/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n", 414),
        (b"GET http://a.test/" + b"x" * 9000, 414),  # refused before the line even ends
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n"
         + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n",
         431),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n"
         b"Content-Length: 4\r\n\r\nabcd", 400),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999"
         b"\r\n\r\n", 400),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
        (b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
        (b"GET http://user:pw@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
    ],
    ids=[
        "long-request-line", "unterminated-long-line", "101-headers", "70k-header", "cl-and-te",
        "two-content-lengths", "negative-cl", "huge-cl", "te-gzip", "https-absolute-form",
        "ftp-url", "userinfo",
    ],
)  # fmt: skip
async def test_bad_requests_are_refused_with_a_reason(
    proxy: HttpProxy, request_bytes: bytes, status: int
) -> None:
    reply = await _refused(proxy, request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert b"connection: close" in reply.lower()
    assert reply.rstrip().split(b"\r\n")[-1].startswith(b"fluidity: ")
    assert proxy.open_failures == 0


@pytest.mark.parametrize(
    "target", ["a.test", "a.test:0", "a.test:65536", ":443", "[::1", "a.test:https", "a.test:"]
)
async def test_invalid_connect_targets_get_400(proxy: HttpProxy, target: str) -> None:
    reply = await _refused(proxy, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 400 "), reply


async def test_origin_form_requests_get_a_hint(proxy: HttpProxy) -> None:
    async with await RawClient.connect(proxy) as client:
        answer = await client.request("GET", "/index.html")
    assert answer.status == 400
    assert b"this is a proxy: send absolute-form requests" in answer.body


async def test_origin_form_requests_go_to_the_local_handler(make_proxy: ProxyFactory) -> None:
    seen: list[LocalRequest] = []

    async def status_page(request: LocalRequest) -> LocalResponse:
        seen.append(request)
        return LocalResponse(200, b"fluidity agent: ok\n")

    proxy = await make_proxy(local_handler=status_page)
    async with await RawClient.connect(proxy) as client:
        first = await client.request("GET", "/status")
        # An absolute-form URL naming the proxy itself is answered locally, not looped.
        second = await client.request("GET", f"http://127.0.0.1:{port_of(proxy)}/status")
    assert (first.status, first.body) == (200, b"fluidity agent: ok\n")
    assert (second.status, second.body) == (200, b"fluidity agent: ok\n")
    assert [r.target for r in seen] == ["/status", f"http://127.0.0.1:{port_of(proxy)}/status"]
    assert proxy.open_failures == 0


async def test_slowloris_head_is_cut_off_after_header_read_timeout(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(limits=ProxyLimits(header_read_timeout=0.5))
    async with await RawClient.connect(proxy) as client:
        started = time.monotonic()
        await client.send_raw(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-Slow: ")
        reply = await client.read_to_eof(timeout=5)
        elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 3


async def test_silent_connection_is_closed_without_an_answer(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(limits=ProxyLimits(header_read_timeout=0.3))
    async with await RawClient.connect(proxy) as client:
        assert await client.read_to_eof(timeout=5) == b""


async def test_aclose_ends_open_tunnels(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    async with HalfCloseOrigin() as target, await RawClient.connect(proxy) as client:
        head = f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n"
        await client.send_raw(head.encode())
        await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert proxy.active_connections == 1
        await asyncio.wait_for(proxy.aclose(), 5)
        assert await client.read_to_eof() == b""
        assert proxy.active_connections == 0


# -- DirectOpener ------------------------------------------------------------------------------


async def test_direct_stream_queues_early_writes_and_half_closes() -> None:
    async with HalfCloseOrigin() as target:
        stream = await DirectOpener().open("127.0.0.1", target.port)
        try:
            stream.write(b"written before the connection is up")
            stream.write_eof()
            await stream.wait_open()
            reply = b""
            while data := await stream.read():
                reply += data
        finally:
            stream.close()
    digest = hashlib.sha256(b"written before the connection is up").hexdigest()
    assert reply == f"35 {digest}\n".encode()


@pytest.mark.parametrize(
    ("host", "failure"),
    [("127.0.0.1", OpenFailure.REFUSED), ("nosuch.invalid", OpenFailure.DNS)],
)
async def test_direct_open_failures_are_classified(host: str, failure: OpenFailure) -> None:
    stream = await DirectOpener(connect_timeout=5).open(host, closed_port())
    with pytest.raises(StreamOpenError) as failed:
        await stream.wait_open()
    assert failed.value.failure is failure
    with pytest.raises(StreamOpenError):
        await stream.read()  # later calls report the same failure
    stream.close()


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), OpenFailure.DNS),
        (ConnectionRefusedError(111, "refused"), OpenFailure.REFUSED),
        (TimeoutError(), OpenFailure.TIMEOUT),
        (OSError(110, "timed out"), OpenFailure.TIMEOUT),
        (ConnectionResetError(104, "reset"), OpenFailure.RESET),
        (OSError(101, "Network is unreachable"), OpenFailure.UNREACHABLE),
        (OSError(113, "No route to host"), OpenFailure.UNREACHABLE),
        (OSError(24, "Too many open files"), OpenFailure.ERROR),
    ],
)
def test_os_errors_map_to_open_failures(error: OSError, failure: OpenFailure) -> None:
    assert failure_for_oserror(error) is failure


async def test_closing_a_connecting_stream_fails_its_waiters() -> None:
    stream = await DirectOpener().open("127.0.0.1", closed_port())
    stream.close()
    with pytest.raises(StreamOpenError):
        await stream.wait_open()
