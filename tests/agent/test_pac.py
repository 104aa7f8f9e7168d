"""The PAC file the agent serves, evaluated by a real PAC engine (pypac: QuickJS through dukpy)."""

from __future__ import annotations

import pytest
from pypac.parser import PACFile

from fluidity.agent.first_read import client_address
from fluidity.agent.http_messages import LocalRequest
from fluidity.agent.pac import build_pac, parse_pac_result
from fluidity.agent.status import AgentPages, PacSettings
from fluidity.agent.upstream_routes import DIRECT, ProxyEndpoint
from fluidity.certs import PkiPaths
from fluidity.errors import ConfigError

from ..integration.stack import running_server
from .helpers import agent_config, curl, running_agent

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("url", "answer"),
    [
        ("https://example.com/", "PROXY 127.0.0.1:8080"),
        ("http://a.corp.example.com/x", "DIRECT"),
        ("http://corp.example.com/", "DIRECT"),
        ("http://notcorp.example.com/", "PROXY 127.0.0.1:8080"),
        ("http://wiki/", "DIRECT"),
        ("http://localhost:3000/", "DIRECT"),
        ("http://10.1.2.3/", "DIRECT"),
        ("http://192.168.1.1/", "DIRECT"),
        ("http://172.20.0.1/", "DIRECT"),
        ("http://172.32.0.1/", "PROXY 127.0.0.1:8080"),
        ("http://100.64.9.9/", "DIRECT"),
        ("http://[fd00::1]/", "DIRECT"),
        ("http://203.0.113.7:8443/", "PROXY 127.0.0.1:8080"),
        ("http://build.example.org/", "DIRECT"),
        ("http://build.example.org.evil.com/", "PROXY 127.0.0.1:8080"),
    ],
)
def test_the_pac_file_sends_traffic_to_the_agent_except_the_bypass_rules(
    url: str, answer: str
) -> None:
    pac = PACFile(
        build_pac(
            "127.0.0.1:8080",
            direct_hosts=["*.corp.example.com", "build.example.org"],
            direct_cidrs=["100.64.0.0/10"],
        )
    )
    authority = url.split("/")[2]
    host = authority[1:].partition("]")[0] if authority.startswith("[") else authority.split(":")[0]
    assert pac.find_proxy_for_url(url, host) == answer


def test_private_addresses_can_go_through_the_tunnel_too() -> None:
    pac = PACFile(build_pac("127.0.0.1:8080", direct_private=False))
    assert pac.find_proxy_for_url("http://10.1.2.3/", "10.1.2.3") == "PROXY 127.0.0.1:8080"
    assert pac.find_proxy_for_url("http://wiki/", "wiki") == "PROXY 127.0.0.1:8080"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direct_hosts": ["bad host"]}, "pac.direct_hosts"),
        ({"direct_hosts": ["*"]}, "pac.direct_hosts"),
        ({"direct_cidrs": ["10.0.0.0/33"]}, "pac.direct_cidrs"),
        ({"direct_cidrs": ["fd00::/8"]}, "only IPv4"),
    ],
)
def test_bad_bypass_rules_are_config_errors(kwargs: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_pac("127.0.0.1:8080", **kwargs)  # type: ignore[arg-type]


async def test_the_agent_serves_its_pac_file_and_a_pac_engine_agrees(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port, pac={"direct_hosts": [".intranet.test"]}) as agent,
    ):
        port = agent.proxy_port
        result = await curl("-sS", "-D", "-", f"http://127.0.0.1:{port}/proxy.pac")
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: application/x-ns-proxy-autoconfig" in head
    pac = PACFile(body.decode())
    expected = f"PROXY 127.0.0.1:{port}"
    assert pac.find_proxy_for_url("https://example.com/", "example.com") == expected
    assert pac.find_proxy_for_url("http://a.intranet.test/", "a.intranet.test") == "DIRECT"


def test_an_agent_with_a_bad_bypass_rule_does_not_start(pki: PkiPaths) -> None:
    from fluidity.agent.app import Agent

    with pytest.raises(ConfigError, match=r"pac\.direct_hosts"):
        Agent(agent_config(pki, 8443, pac={"direct_hosts": ["not a host"]}))


async def test_an_agent_on_every_interface_names_the_host_the_pac_came_from() -> None:
    pages = AgentPages(None, PacSettings(), listening=lambda: ("0.0.0.0", 8080))
    token = client_address.set("192.0.2.10")  # a LAN client (a label here: nothing is dialled)
    try:
        answer = await pages(LocalRequest("GET", "/proxy.pac", (("Host", "laptop.lan:8080"),)))
        bad_host = await pages(LocalRequest("GET", "/proxy.pac", (("Host", "a b"),)))
        posted = await pages(LocalRequest("POST", "/proxy.pac", ()))
    finally:
        client_address.reset(token)
    assert answer.status == 200 and b'"PROXY laptop.lan:8080"' in answer.body
    assert b'"PROXY 127.0.0.1:8080"' in bad_host.body
    assert posted.status == 405


def test_pac_answers_become_routes() -> None:
    routes = parse_pac_result("PROXY a.corp:3128; SOCKS5 s:1080; HTTPS h:443; DIRECT; junk")
    assert isinstance(routes[0], ProxyEndpoint) and routes[0].address == "a.corp:3128"
    assert routes[1:] == [DIRECT]
    assert parse_pac_result("SOCKS s:1080") == [DIRECT]
    assert parse_pac_result("") == [DIRECT]
