"""SOCKS5 on the running agent over the real tunnel: curl as the client, raw bytes for bad input."""

from __future__ import annotations

import asyncio

import pytest

from fluidity.certs import PkiPaths
from fluidity.config import EgressConfig

from ..integration.origins import HttpOrigin
from ..integration.stack import running_server
from .helpers import connect_request, curl, running_agent, socks_exchange

pytestmark = pytest.mark.timeout(60)

USERS = {"users": [{"username": "alice", "password": "s3cret"}]}


async def test_curl_socks5_hostname_and_http_share_the_agent_port(pki: PkiPaths) -> None:
    await share_the_port(pki)


@pytest.mark.stdlib_loop  # the front door moves transports with set_protocol: check both loops
async def test_http_and_socks5_share_the_port_on_asyncios_own_loop_too(pki: PkiPaths) -> None:
    assert not type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    await share_the_port(pki)


async def share_the_port(pki: PkiPaths) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
    ):
        port = agent.proxy_port
        by_name = await curl(
            "-sS",
            "--socks5-hostname",
            f"127.0.0.1:{port}",
            f"http://localhost:{origin.port}/via-socks-name",
        )
        by_address = await curl(
            "-sS", "--socks5", f"127.0.0.1:{port}", f"http://localhost:{origin.port}/via-socks-ip"
        )
        by_http = await curl("-sS", "-x", f"http://127.0.0.1:{port}", origin.url("/via-http"))
        assert agent.clients.socks is not None
        assert agent.clients.socks.total_connections == 2
    for result, path in (
        (by_name, "/via-socks-name"),
        (by_address, "/via-socks-ip"),
        (by_http, "/via-http"),
    ):
        assert result.returncode == 0, result.stderr
        assert result.json()["target"] == path
    assert server.stats.snapshot().streams_opened == 3


async def test_socks_port_serves_socks5_only(pki: PkiPaths) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, socks_port=0) as agent,
    ):
        socks_port = agent.clients.socks_port
        assert socks_port is not None and socks_port != agent.proxy_port
        ok = await curl("-sS", "-x", f"socks5h://127.0.0.1:{socks_port}", origin.url("/s"))
        # An HTTP request on the SOCKS-only port is not SOCKS5: closed without an answer.
        assert await socks_exchange(socks_port, b"GET / HTTP/1.1\r\n\r\n", expect=1) == b""
    assert ok.returncode == 0, ok.stderr
    assert ok.json()["target"] == "/s"


async def test_socks5_login_is_required_when_proxy_users_are_configured(pki: PkiPaths) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, proxy_auth=USERS) as agent,
    ):
        proxy = f"127.0.0.1:{agent.proxy_port}"
        good = await curl("-sS", "-x", f"socks5h://alice:s3cret@{proxy}", origin.url("/in"))
        wrong = await curl("-sS", "-x", f"socks5h://alice:wrong@{proxy}", origin.url("/no"))
        anonymous = await curl("-sS", "-x", f"socks5h://{proxy}", origin.url("/no"))
        assert agent.clients.auth.failures == 1
    assert good.returncode == 0, good.stderr
    assert good.json()["target"] == "/in"
    assert wrong.returncode == 97 and b"rejected by the SOCKS5 server" in wrong.stderr
    assert anonymous.returncode != 0
    assert [r.target for r in origin.requests] == ["/in"]


async def test_failed_opens_get_the_matching_socks_reply(pki: PkiPaths, free_port: int) -> None:
    greeting = b"\x05\x01\x00"
    async with running_server(pki) as server, running_agent(pki, server.port) as agent:
        refused = await socks_exchange(
            agent.proxy_port, greeting, connect_request("127.0.0.1", free_port), expect=12
        )
    async with (
        running_server(pki, egress=EgressConfig()) as strict,
        running_agent(pki, strict.port) as agent,
    ):
        denied = await socks_exchange(
            agent.proxy_port, greeting, connect_request("127.0.0.1", 80), expect=12
        )
    async with running_agent(pki, free_port, tunnel={"link_wait_timeout": 0.2}) as agent:
        down = await socks_exchange(
            agent.proxy_port, greeting, connect_request("127.0.0.1", 80), expect=12
        )
    assert refused == b"\x05\x00" + b"\x05\x05\x00\x01" + bytes(6)  # connection refused
    assert denied == b"\x05\x00" + b"\x05\x02\x00\x01" + bytes(6)  # not allowed by ruleset
    assert down == b"\x05\x00" + b"\x05\x01\x00\x01" + bytes(6)  # general failure


async def test_unsupported_commands_and_bad_input_are_answered_and_closed(pki: PkiPaths) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, socks_port=0) as agent,
    ):
        socks = agent.clients.socks_port
        assert socks is not None
        bind = await socks_exchange(
            socks, b"\x05\x01\x00", b"\x05\x02\x00\x01" + bytes(6), expect=20
        )
        udp = await socks_exchange(
            socks, b"\x05\x01\x00", b"\x05\x03\x00\x01" + bytes(6), expect=20
        )
        bad_type = await socks_exchange(socks, b"\x05\x01\x00\x05\x01\x00\x09", expect=20)
        socks4 = await socks_exchange(socks, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", expect=8)
        no_methods = await socks_exchange(socks, b"\x05\x00", expect=8)
        truncated = await socks_exchange(socks, b"\x05\x01", expect=8, eof=True)
        # After all that, a good client still gets through.
        ok = await curl("-sS", "-x", f"socks5h://127.0.0.1:{socks}", origin.url("/after"))
    assert bind == b"\x05\x00\x05\x07\x00\x01" + bytes(6)
    assert udp == b"\x05\x00\x05\x07\x00\x01" + bytes(6)
    assert bad_type == b"\x05\x00\x05\x08\x00\x01" + bytes(6)
    assert socks4 == b""
    assert no_methods == b"\x05\xff"
    assert truncated == b""
    assert ok.returncode == 0 and ok.json()["target"] == "/after"


async def test_lengths_that_promise_more_than_the_client_sends_end_in_a_clean_close(
    pki: PkiPaths,
) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, proxy_auth=USERS) as agent,
    ):
        port = agent.proxy_port
        login = b"\x05\x01\x02"
        # 200 methods announced, 2 sent; a user name of 50 bytes announced, 5 sent; a domain of
        # 40 bytes announced, 4 sent: each then closes its side.
        methods = await socks_exchange(port, b"\x05\xc8\x00\x02", expect=2, eof=True)
        short_user = await socks_exchange(port, login, b"\x01\x32alice", expect=4, eof=True)
        short_name = await socks_exchange(
            port, login, b"\x01\x05alice\x06s3cret", b"\x05\x01\x00\x03\x28exam", expect=6,
            eof=True,
        )  # fmt: skip
        ok = await curl("-sS", "-x", f"socks5h://alice:s3cret@127.0.0.1:{port}", origin.url("/ok"))
        socks = agent.clients.socks
        assert socks is not None
        while socks.active_connections:  # bounded by the test timeout
            await asyncio.sleep(0.01)
        assert agent.clients.auth.failures == 0 and socks.open_failures == 0
    assert methods == b""  # nothing answered before the greeting is complete
    assert short_user == b"\x05\x02"  # method chosen, login never complete
    assert short_name == b"\x05\x02\x01\x00"  # logged in, request never complete
    assert ok.returncode == 0 and ok.json()["target"] == "/ok"
    assert [r.target for r in origin.requests] == ["/ok"]


async def test_a_silent_socks_client_is_closed_after_the_handshake_timeout(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port, socks={"handshake_timeout": 0.2}) as agent,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
        writer.write(b"\x05\x01\x00")  # greeting, then nothing
        answer = await asyncio.wait_for(reader.read(100), 10)
        rest = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
    assert answer == b"\x05\x00"
    assert rest == b""  # closed


async def test_socks_can_be_turned_off(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port, socks={"enabled": False}) as agent,
    ):
        # The first byte 0x05 now goes to the HTTP proxy, which refuses it as malformed.
        answer = await socks_exchange(agent.proxy_port, b"\x05\x01\x00\r\n\r\n", expect=12)
    assert answer.startswith(b"HTTP/1.1 400")
