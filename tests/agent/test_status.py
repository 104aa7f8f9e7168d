"""The agent's status: GET /status (JSON), GET / (HTML), who may see them, and `fluidity status`."""

from __future__ import annotations

import asyncio
import base64

import pytest

from fluidity import cli
from fluidity.agent.first_read import client_address
from fluidity.agent.http_messages import LocalRequest
from fluidity.agent.status import AgentPages, AgentStatus, PacSettings
from fluidity.certs import PkiPaths
from fluidity.config import TunnelConfig

from ..integration.origins import HttpOrigin
from ..integration.stack import running_server
from .helpers import curl, running_agent

pytestmark = pytest.mark.timeout(60)


async def test_status_reports_link_server_streams_and_bytes_each_way(pki: PkiPaths) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
    ):
        assert await agent.tunnel.wait_connected(10)
        server_port = server.port
        base = f"http://127.0.0.1:{agent.proxy_port}"
        before = (await curl("-sS", f"{base}/status")).json()
        fetched = await curl("-sS", "-o", "/dev/null", "-x", base, origin.url("/bytes/100000"))
        assert fetched.returncode == 0
        after = (await curl("-sS", f"{base}/status")).json()
        page = await curl("-sS", "-i", f"{base}/")
        missing = await curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/nope")
        # An absolute-form request naming the agent itself is answered too (no loop).
        absolute = await curl("-sS", "-x", base, f"{base}/status")
        # Bytes of a link that closed still count.
        for link in list(server.links):
            assert link.transport is not None
            link.transport.abort()
        await asyncio.wait_for(agent.tunnel.links[0].closed, 10)
        closed = (await curl("-sS", f"{base}/status")).json()
    link = before["link"]
    assert link["state"] == "connected" and link["server"] == f"127.0.0.1:{server_port}"
    assert link["server_name"] == "fluidity-server" and link["via"] == "direct"
    assert link["links_up"] == 1 and before["lifecycle"] is None
    assert link["windows_grown"] == 0 and link["window_growth_bytes"] == 0  # no long path here
    assert link["windows_shrunk"] == 0
    assert link["frame_size_asked"] == TunnelConfig().max_frame_size  # loopback: never less
    assert before["uptime_seconds"] >= 0 and before["streams_open"] == 0
    assert after["bytes"]["received"] >= before["bytes"]["received"] + 100_000
    assert after["bytes"]["sent"] > before["bytes"]["sent"]
    assert after["clients"]["http_requests"] >= 1
    assert closed["bytes"]["received"] >= after["bytes"]["received"]
    assert page.stdout.startswith(b"HTTP/1.1 200")
    assert (
        b"text/html" in page.stdout and b"<title>Fluidity agent: connected</title>" in page.stdout
    )
    assert missing.stdout == b"404"
    assert absolute.json()["link"]["state"] == "connected"


async def test_status_shows_recent_errors_while_the_server_is_away(
    pki: PkiPaths, free_port: int
) -> None:
    async with running_agent(pki, free_port) as agent:
        while not agent.tunnel.last_error:  # bounded by the test timeout
            await asyncio.sleep(0.02)
        status = (await curl("-sS", f"http://127.0.0.1:{agent.proxy_port}/status")).json()
    assert status["link"]["state"] == "reconnecting"
    assert "connection refused" in status["link"]["last_error"]
    assert any(
        e["event"] == "link.down" and e["level"] == "warning" for e in status["recent_errors"]
    )


async def test_status_pages_are_for_this_machine_unless_allowed(pki: PkiPaths) -> None:
    async with running_server(pki) as server, running_agent(pki, server.port) as agent:
        status = agent.clients.status
        assert status is not None
        private = AgentPages(status, PacSettings(), listening=lambda: ("127.0.0.1", 8080))
        shared = AgentPages(
            status,
            PacSettings(),
            listening=lambda: ("0.0.0.0", 8080),
            auth=agent.clients.auth,
            allow_remote=True,
        )
        from fluidity.agent.auth import ProxyAuthenticator

        with_users = AgentPages(
            status,
            PacSettings(),
            listening=lambda: ("0.0.0.0", 8080),
            auth=ProxyAuthenticator([("alice", "s3cret")]),
            allow_remote=True,
        )
        login = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        token = client_address.set("192.0.2.10")  # a LAN client's address, as a label
        try:
            refused = await private(LocalRequest("GET", "/status", ()))
            pac = await private(LocalRequest("GET", "/proxy.pac", ()))
            allowed = await shared(LocalRequest("GET", "/status", ()))
            challenge = await with_users(LocalRequest("GET", "/", ()))
            logged_in = await with_users(LocalRequest("GET", "/", (("Authorization", login),)))
        finally:
            client_address.reset(token)
    assert refused.status == 403 and b"status.allow_remote" in refused.body
    assert pac.status == 200  # browsers on the LAN fetch the PAC without credentials
    assert allowed.status == 200 and allowed.content_type == "application/json"
    assert challenge.status == 401
    assert dict(challenge.headers)["WWW-Authenticate"].startswith('Basic realm="fluidity"')
    assert logged_in.status == 200 and logged_in.content_type.startswith("text/html")


async def test_link_state_is_waking_while_the_lifecycle_wakes_the_server(
    pki: PkiPaths, free_port: int
) -> None:
    async with running_agent(pki, free_port) as agent:
        status = AgentStatus(agent.tunnel, agent.clients.front, lifecycle=lambda: "waking")
        snapshot = status.snapshot()
    assert snapshot["link"]["state"] == "waking" and snapshot["lifecycle"] == "waking"


async def test_fluidity_status_prints_a_table_and_exits_by_link_state(
    pki: PkiPaths, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(pki) as server, running_agent(pki, server.port) as agent:
        assert await agent.tunnel.wait_connected(10)
        server_port = server.port
        url = f"http://127.0.0.1:{agent.proxy_port}/status"
        code = await asyncio.to_thread(cli.main, ["status", "--url", url])
        shown = capsys.readouterr().out
        as_json = await asyncio.to_thread(cli.main, ["status", "--url", url, "--json"])
        printed = capsys.readouterr().out
    assert code == 0 and as_json == 0
    assert "connected" in shown and f"127.0.0.1:{server_port}" in shown
    assert '"state": "connected"' in printed
    async with running_agent(pki, free_port) as agent:
        url = f"http://127.0.0.1:{agent.proxy_port}/status"
        down = await asyncio.to_thread(cli.main, ["status", "--url", url])
    assert down == 1
    gone = await asyncio.to_thread(cli.main, ["status", "--url", f"http://127.0.0.1:{free_port}/"])
    assert gone == 2
    assert "no agent answers at" in capsys.readouterr().err
