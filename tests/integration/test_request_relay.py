"""Keep-alive requests relayed by callbacks (fluidity.agent.request_relay) through the whole agent
and a server: reuse, pipelining, re-framing, stale upstreams, error answers, backpressure, time
limits, and the hand-over to the task-based session for everything else."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig

from .origins import HttpOrigin, pattern_sha256
from .stack import running_server, tcp_server
from .test_connect_tunnel import idle, running_agent, until

MiB = 1024 * 1024
LOOPBACK = EgressConfig(allow_cidrs=["127.0.0.1/32"])

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def stack(pki: PkiPaths, **agent_overrides: Any) -> AsyncIterator[tuple[Agent, HttpOrigin]]:
    async with (
        running_server(pki, egress=LOOPBACK) as server,
        running_agent(pki, server.port, **agent_overrides) as agent,
        HttpOrigin() as origin,
    ):
        yield agent, origin


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> Response:
    """One response: Content-Length, chunked (trailers ignored) or read-until-close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    response = Response(status, headers, b"")  # type: ignore[arg-type]
    if head_request or status in (204, 304) or 100 <= status < 200:
        return response
    if length := response.header("Content-Length"):
        response.body = await reader.readexactly(int(length[0]))
    elif response.header("Transfer-Encoding") == ["chunked"]:
        pieces = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        response.body = b"".join(pieces)
    else:
        response.body = await reader.read(-1)
    return response


def get(url: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {url} HTTP/{version}", "Host: ignored.example", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def open_client(agent: Agent) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", agent.proxy_port)


# --- the common case ------------------------------------------------------------------------


async def test_keep_alive_requests_reuse_one_stream_and_hold_no_task(pki: PkiPaths) -> None:
    await _keep_alive_requests(pki)


@pytest.mark.stdlib_loop
async def test_keep_alive_requests_work_the_same_on_the_asyncio_loop(pki: PkiPaths) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")
    await _keep_alive_requests(pki)


async def _keep_alive_requests(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        baseline = len(asyncio.all_tasks())
        for n in range(5):
            writer.write(get(origin.url(f"/echo/{n}"), f"X-Seq: {n}"))
            response = await read_response(reader)
            assert response.status == 200
            info = response.json()
            assert info["target"] == f"/echo/{n}"  # origin form towards the origin
            sent = [(name.lower(), value) for name, value in info["headers"]]
            assert sent == [("host", origin.authority), ("x-seq", str(n))]
            # One more task at most: the origin's handler for its one connection.
            assert len(asyncio.all_tasks()) - baseline <= 1
        assert agent.proxy.task_less_connections == 1
        assert agent.proxy.requests == 5
        assert len(agent.tunnel.links[0].streams) == 1  # one upstream, reused
        assert origin.connections == 1
        writer.close()
        await until(lambda: idle(agent))


async def test_pipelined_requests_are_answered_in_order(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(b"".join(get(origin.url(f"/p/{n}")) for n in range(10)))
        for n in range(10):
            response = await read_response(reader)
            assert response.json()["target"] == f"/p/{n}"
        assert agent.proxy.task_less_connections == 1
        writer.close()


async def test_head_get_and_bodiless_statuses_keep_the_connection(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/bytes/1000"), method="HEAD"))
        head = await read_response(reader, head_request=True)
        assert head.status == 200 and head.header("Content-Length") == ["1000"]
        for status in (204, 304):
            writer.write(get(origin.url(f"/status/{status}")))
            assert (await read_response(reader)).status == status
        writer.write(get(origin.url("/bytes/1000")))
        assert len((await read_response(reader)).body) == 1000
        assert agent.proxy.task_less_connections == 1 and origin.connections == 1
        writer.close()


async def test_unknown_length_bodies_are_rechunked_for_http_11_clients(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        for framing in ("chunked", "close"):
            writer.write(get(origin.url(f"/bytes/300000?framing={framing}")))
            response = await read_response(reader)
            assert response.header("Transfer-Encoding") == ["chunked"]
            assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(300000)
        assert agent.proxy.task_less_connections == 1  # still open, still relayed
        writer.close()


async def test_http_10_client_gets_a_close_delimited_body_and_the_connection_ends(
    pki: PkiPaths,
) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/bytes/5000?framing=chunked"), version="1.0"))
        response = await read_response(reader)
        assert response.header("Connection") == ["close"]
        assert not response.header("Transfer-Encoding")
        assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(5000)
        writer.close()
        await until(lambda: idle(agent))


async def test_hop_by_hop_headers_are_dropped_both_ways(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/hop"), "Connection: X-Mine", "X-Mine: 1", "TE: trailers"))
        response = await read_response(reader)
        assert response.body == b"hop" and response.header("X-Kept") == ["yes"]
        for name in ("X-Internal", "Keep-Alive", "Proxy-Authenticate"):
            assert not response.header(name)
        sent = origin.requests[-1]
        assert not sent.header("X-Mine") and not sent.header("TE")
        writer.close()


# --- upstream failures ----------------------------------------------------------------------


async def test_stale_upstream_is_replaced_and_the_request_replayed(pki: PkiPaths) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        # The origin closes after answering, without saying so: the stream looks reusable.
        writer.write(get(origin.url("/first?drop=1")))
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.1)
        writer.write(get(origin.url("/second")))
        response = await read_response(reader)
        assert response.status == 200 and response.json()["target"] == "/second"
        assert origin.connections == 2
        writer.close()


async def test_open_failures_are_answered_and_the_connection_kept(
    pki: PkiPaths, free_port: int
) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(f"http://127.0.0.1:{free_port}/"))
        refused = await read_response(reader)
        assert refused.status == 502
        assert refused.body.startswith(b"fluidity: cannot reach 127.0.0.1:")
        assert b"refused" in refused.body
        assert agent.proxy.open_failures == 1
        writer.write(get(origin.url("/after")))
        assert (await read_response(reader)).json()["target"] == "/after"
        writer.close()


async def test_denied_target_gets_403_naming_the_policy(pki: PkiPaths) -> None:
    async with (
        running_server(pki, egress=EgressConfig()) as server,  # loopback denied
        running_agent(pki, server.port) as agent,
        HttpOrigin() as origin,
    ):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/")))
        response = await read_response(reader)
        assert response.status == 403 and b"egress policy" in response.body
        writer.close()


async def _scripted_origin(answer: bytes, *, close: bool = True) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()

    return handler


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (b"SMTP ready\r\n\r\n", b"invalid response"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", b"invalid response"),
        (b"", b"closed the connection, no response"),
    ],
    ids=["garbage", "unasked-101", "nothing"],
)
async def test_bad_origin_answers_get_502_and_the_connection_kept(
    pki: PkiPaths, answer: bytes, text: bytes
) -> None:
    async with (
        running_server(pki, egress=LOOPBACK) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(await _scripted_origin(answer)) as port,
        HttpOrigin() as origin,
    ):
        reader, writer = await open_client(agent)
        writer.write(get(f"http://127.0.0.1:{port}/"))
        response = await read_response(reader)
        assert response.status == 502 and text in response.body
        writer.write(get(origin.url("/after")))
        assert (await read_response(reader)).status == 200
        writer.close()


async def test_body_cut_short_by_the_origin_closes_the_client(pki: PkiPaths) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this"
    async with (
        running_server(pki, egress=LOOPBACK) as server,
        running_agent(pki, server.port) as agent,
        tcp_server(await _scripted_origin(answer)) as port,
    ):
        reader, writer = await open_client(agent)
        writer.write(get(f"http://127.0.0.1:{port}/"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.read(-1) == b"only this"  # then the agent closes: cut short
        writer.close()
        await until(lambda: idle(agent))


# --- backpressure and time limits -----------------------------------------------------------


async def test_client_that_stops_reading_stops_the_origin_within_a_window(pki: PkiPaths) -> None:
    size = 64 * MiB
    window = 256 * 1024
    async with (
        running_server(pki, egress=LOOPBACK, stream_window=window) as server,
        running_agent(pki, server.port, tunnel={"stream_window": window}) as agent,
        HttpOrigin() as origin,
    ):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url(f"/bytes/{size}")))
        writer.transport.pause_reading()  # the client reads nothing for a while
        await asyncio.sleep(0.5)
        link = agent.tunnel.links[0]
        stalled_at = link.session.bytes_received
        assert stalled_at < size // 4
        await asyncio.sleep(0.2)
        assert link.session.bytes_received <= stalled_at + window
        writer.transport.resume_reading()
        response = await read_response(reader)
        assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
        assert agent.proxy.task_less_connections == 1
        writer.close()


async def test_idle_connection_is_closed_after_idle_timeout(pki: PkiPaths) -> None:
    async with stack(pki, http={"idle_timeout": 0.3}) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/")))
        assert (await read_response(reader)).status == 200
        assert await asyncio.wait_for(reader.read(-1), 5) == b""  # closed, no answer
        writer.close()
        await until(lambda: idle(agent))


async def test_head_under_way_gets_408_after_header_read_timeout(pki: PkiPaths) -> None:
    async with stack(pki, http={"header_read_timeout": 0.3}) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/")))
        assert (await read_response(reader)).status == 200
        writer.write(b"GET http://slow.example/ HTTP/1.1\r\nHost: slo")  # never finished
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 408 and response.header("Connection") == ["close"]
        assert await reader.read(-1) == b""
        writer.close()
        await until(lambda: idle(agent))


# --- hand-over to the session ---------------------------------------------------------------


async def test_request_with_a_body_goes_to_the_session_on_the_same_connection(
    pki: PkiPaths,
) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/one")))
        assert (await read_response(reader)).status == 200
        assert agent.proxy.task_less_connections == 1
        body = b"x" * 100_000
        upload = get(origin.url("/upload"), f"Content-Length: {len(body)}", method="POST")
        # The upload and a GET behind it, in one write: the hand-over keeps every byte.
        writer.write(upload + body + get(origin.url("/three")))
        posted = (await read_response(reader)).json()
        assert posted["body_length"] == len(body)
        assert posted["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert (await read_response(reader)).json()["target"] == "/three"
        assert agent.proxy.task_less_connections == 0
        assert agent.proxy.active_connections == 1  # the same connection, now a session's
        assert agent.proxy.requests == 3
        writer.close()
        await until(lambda: idle(agent))


@pytest.mark.parametrize(
    ("request_bytes", "status", "text"),
    [
        # Origin form is for the proxy itself: its status page, and a hint elsewhere.
        (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", 200, b"fluidity"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404, b""),
        (b"GET http://a b/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"fluidity: "),
        # Not idempotent, so not replayable: the session sends it (here to a name that fails).
        (b"POST http://name.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n", 502, b"DNS"),
    ],
    ids=["origin-form", "asterisk", "invalid", "post"],
)
async def test_requests_the_relay_does_not_serve_are_answered_by_the_session(
    pki: PkiPaths, request_bytes: bytes, status: int, text: bytes
) -> None:
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/one")))
        assert (await read_response(reader)).status == 200
        writer.write(request_bytes)
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == status
        assert text in response.body
        assert agent.proxy.task_less_connections == 0
        writer.close()
        await until(lambda: idle(agent))


async def test_split_head_and_proxy_auth_go_to_the_session(pki: PkiPaths) -> None:
    users = {"users": [{"username": "ann", "password": "s3cret"}]}
    async with stack(pki, proxy_auth=users) as (agent, origin):
        reader, writer = await open_client(agent)
        writer.write(get(origin.url("/")))
        assert (await read_response(reader)).status == 407
        assert agent.proxy.task_less_connections == 0
        writer.close()
    async with stack(pki) as (agent, origin):
        reader, writer = await open_client(agent)
        request = get(origin.url("/split"))
        writer.write(request[:20])
        await asyncio.sleep(0.05)
        writer.write(request[20:])
        assert (await read_response(reader)).json()["target"] == "/split"
        assert agent.proxy.task_less_connections == 0
        writer.close()


async def test_stopping_the_agent_closes_open_relays(pki: PkiPaths) -> None:
    async with (
        running_server(pki, egress=LOOPBACK) as server,
        HttpOrigin() as origin,
    ):
        async with running_agent(pki, server.port) as agent:
            clients = [await open_client(agent) for _ in range(10)]
            for reader, writer in clients:
                writer.write(get(origin.url("/")))
                assert (await read_response(reader)).status == 200
            assert agent.proxy.task_less_connections == 10
        for reader, writer in clients:
            assert await asyncio.wait_for(reader.read(-1), 5) == b""
            writer.close()
        assert agent.proxy.task_less_connections == 0
