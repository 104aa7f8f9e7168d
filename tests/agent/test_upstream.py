"""The agent's link through a corporate proxy: Basic, NTLM, Negotiate, PAC, and how it fails."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluidity.agent.pac import UpstreamPac
from fluidity.agent.upstream import UpstreamConnector, UpstreamError
from fluidity.agent.upstream_auth import Credentials, parse_challenges
from fluidity.agent.upstream_routes import (
    DIRECT,
    ProxyEndpoint,
    bypasses,
    parse_proxy_url,
    proxy_from_environment,
)
from fluidity.certs import PkiPaths
from fluidity.errors import ConfigError

from ..integration.origins import HttpOrigin
from ..integration.stack import running_server
from .corporate_proxy import CorporateProxy
from .helpers import curl, running_agent

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test user CORP\\alice / s3cret, for pyspnego's NTLM acceptor (and its client cache)."""
    path = tmp_path / "ntlm_users"
    path.write_text("CORP:alice:s3cret\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(path))
    yield path


async def fetch_through(agent_port: int, origin: HttpOrigin) -> int:
    result = await curl(
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        f"http://127.0.0.1:{agent_port}",
        origin.url("/status/200"),
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


# --- the link through the proxy, end to end ------------------------------------------------------


@pytest.mark.parametrize(
    ("schemes", "user", "accepted"),
    [
        (["Basic"], "alice", "Basic"),
        (["NTLM"], "CORP%5Calice", "NTLM"),
        (["Negotiate", "NTLM", "Basic"], "CORP%5Calice", "Negotiate"),
    ],
)
async def test_link_through_an_authenticating_proxy_carries_a_real_request(
    pki: PkiPaths, ntlm_users: Path, schemes: list[str], user: str, accepted: str
) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        CorporateProxy(schemes) as proxy,
    ):
        upstream = f"http://{user}:s3cret@127.0.0.1:{proxy.port}"
        async with running_agent(pki, server.port, upstream_proxy=upstream) as agent:
            assert await agent.tunnel.wait_connected(10), agent.tunnel.last_error
            assert await fetch_through(agent.proxy_port, origin) == 200
            assert agent.route == f"proxy 127.0.0.1:{proxy.port} (from upstream_proxy)"
    assert proxy.tunnels >= 1
    assert proxy.accepted_schemes[0] == accepted
    assert len(server.links) == 0  # the agent left cleanly


@pytest.mark.stdlib_loop  # the connector uses loop.sock_* calls: check asyncio's loop as well
async def test_link_through_an_ntlm_proxy_on_asyncios_own_loop_too(
    pki: PkiPaths, ntlm_users: Path
) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        CorporateProxy(["NTLM"]) as proxy,
        running_agent(
            pki, server.port, upstream_proxy=f"http://CORP%5Calice:s3cret@127.0.0.1:{proxy.port}"
        ) as agent,
    ):
        assert await agent.tunnel.wait_connected(10), agent.tunnel.last_error
        assert await fetch_through(agent.proxy_port, origin) == 200
    assert proxy.accepted_schemes == ["NTLM"]


async def test_ntlm_uses_the_logged_in_users_credentials_when_none_are_configured(
    pki: PkiPaths, ntlm_users: Path
) -> None:
    # On Linux, pyspnego's credential store for the current user is NTLM_USER_FILE (Kerberos
    # would use the ticket cache, Windows its SSPI logon session).
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        CorporateProxy(["NTLM"]) as proxy,
        running_agent(pki, server.port, upstream_proxy=proxy.url) as agent,
    ):
        assert await agent.tunnel.wait_connected(10), agent.tunnel.last_error
        assert await fetch_through(agent.proxy_port, origin) == 200
    assert proxy.accepted_schemes == ["NTLM"]


async def test_wrong_credentials_give_one_clear_line_naming_the_scheme_and_retries_go_on(
    pki: PkiPaths, ntlm_users: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fluidity")
    async with (
        running_server(pki) as server,
        CorporateProxy(["NTLM"]) as proxy,
        running_agent(
            pki,
            server.port,
            upstream_proxy=f"http://CORP%5Calice:wrong@127.0.0.1:{proxy.port}",
            tunnel={"reconnect_initial": 0.05, "reconnect_max": 0.1},
        ) as agent,
    ):
        await proxy.wait_for_requests(7)  # three per attempt: several attempts, with backoff
        assert agent.tunnel.state == "reconnecting"
        assert proxy.tunnels == 0
    downs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("link.down")]
    assert len(downs) == 1, downs  # one line, not one per retry
    assert "refused the NTLM credentials of user 'CORP\\\\alice'" in downs[0]
    assert caplog.records[[r.getMessage() for r in caplog.records].index(downs[0])].levelno == (
        logging.WARNING
    )
    retries = [r for r in caplog.records if r.getMessage().startswith("link.retrying")]
    assert len(retries) >= 1


async def test_a_proxy_asking_basic_without_credentials_says_what_to_configure(
    pki: PkiPaths,
) -> None:
    async with CorporateProxy(["Basic"]) as proxy:
        connector = UpstreamConnector("127.0.0.1", 9, proxy=parse_proxy_url(proxy.url, "test"))
        with pytest.raises(UpstreamError) as caught:
            await connector()
    message = str(caught.value)
    assert "asks for Basic authentication (407)" in message
    assert "no usable credentials" in message and "http://USER:PASSWORD@" in message


async def test_a_proxy_asking_only_for_an_unsupported_scheme_is_named(pki: PkiPaths) -> None:
    async with CorporateProxy(['Digest realm="corp", nonce="x"']) as proxy:
        endpoint = parse_proxy_url(f"http://a:b@127.0.0.1:{proxy.port}", "test")
        with pytest.raises(UpstreamError) as caught:
            await UpstreamConnector("127.0.0.1", 9, proxy=endpoint)()
    assert "asks for Digest authentication" in str(caught.value)
    assert "cannot answer" in str(caught.value) and "px or cntlm" in str(caught.value)


async def test_a_407_loop_is_bounded_and_explained(ntlm_users: Path) -> None:
    # The proxy closes after each 407, so the NTLM challenge can never be answered on the same
    # connection: without a bound the agent would go round forever.
    async with CorporateProxy(["NTLM"], behaviour="close_after_407") as proxy:
        endpoint = parse_proxy_url(f"http://CORP%5Calice:s3cret@127.0.0.1:{proxy.port}", "t")
        connector = UpstreamConnector("127.0.0.1", 9, proxy=endpoint, max_auth_rounds=4)
        with pytest.raises(UpstreamError) as caught:
            await connector()
    assert "answered 407 5 times in a row (NTLM)" in str(caught.value)
    assert proxy.connect_requests == 5


@pytest.mark.parametrize(("scheme", "user"), [("Basic", "alice"), ("NTLM", "CORP%5Calice")])
async def test_a_proxy_that_drops_the_connection_after_its_407_is_explained(
    ntlm_users: Path, scheme: str, user: str
) -> None:
    # The 407 announces a kept-alive connection, then the proxy closes it: the next request
    # meets a closed (or reset) socket, which must read as the proxy closing, not as an errno.
    async with CorporateProxy([scheme], behaviour="drop_after_407") as proxy:
        endpoint = parse_proxy_url(f"http://{user}:s3cret@127.0.0.1:{proxy.port}", "t")
        with pytest.raises(UpstreamError) as caught:
            await UpstreamConnector("127.0.0.1", 9, proxy=endpoint)()
    message = str(caught.value)
    assert f"upstream proxy {endpoint.address} closed the connection during CONNECT" in message
    assert proxy.connect_requests == 1


async def test_basic_credentials_refused_again_and_again_end_at_once() -> None:
    async with CorporateProxy(["Basic"], basic_users={}) as proxy:
        endpoint = parse_proxy_url(f"http://bob:pw@127.0.0.1:{proxy.port}", "upstream_proxy")
        with pytest.raises(UpstreamError) as caught:
            await UpstreamConnector("127.0.0.1", 9, proxy=endpoint)()
    assert "refused the Basic credentials of user 'bob'" in str(caught.value)
    assert proxy.connect_requests == 2  # once without, once with credentials


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("close_mid_handshake", "closed the connection during CONNECT 127.0.0.1:9"),
        ("forbidden", "answered 403 Forbidden to CONNECT 127.0.0.1:9: it forbids"),
        ("garbage", "sent a malformed answer to CONNECT"),
    ],
)
async def test_a_misbehaving_proxy_is_explained(behaviour: str, expected: str) -> None:
    async with CorporateProxy(["Basic"], behaviour=behaviour) as proxy:
        endpoint = parse_proxy_url(proxy.url, "upstream_proxy")
        with pytest.raises(UpstreamError) as caught:
            await UpstreamConnector("127.0.0.1", 9, proxy=endpoint)()
    assert expected in str(caught.value)


async def test_an_unreachable_proxy_is_named(free_port: int) -> None:
    endpoint = parse_proxy_url(f"127.0.0.1:{free_port}", "HTTPS_PROXY")
    with pytest.raises(UpstreamError) as caught:
        await UpstreamConnector("127.0.0.1", 9, proxy=endpoint)()
    assert f"cannot reach upstream proxy 127.0.0.1:{free_port} (from HTTPS_PROXY)" in str(
        caught.value
    )


# --- PAC-chosen routes ---------------------------------------------------------------------------


def write_pac(path: Path, body: str) -> Path:
    path.write_text(f"function FindProxyForURL(url, host) {{ {body} }}\n")
    return path


async def test_upstream_pac_sends_the_link_through_the_proxy_it_names(
    pki: PkiPaths, tmp_path: Path
) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        CorporateProxy(["Basic"]) as proxy,
    ):
        pac = write_pac(
            tmp_path / "corp.pac",
            f'if (shExpMatch(url, "https://127.0.0.1:{server.port}/")) '
            f'return "PROXY 127.0.0.1:{proxy.port}; DIRECT"; return "DIRECT";',
        )
        async with running_agent(
            pki,
            server.port,
            upstream_pac=pac.as_uri(),
            upstream={"username": "alice", "password": "s3cret"},
            tunnel={"connect_timeout": 15},  # the PAC is evaluated in a child process
        ) as agent:
            assert await agent.tunnel.wait_connected(20), agent.tunnel.last_error
            assert await fetch_through(agent.proxy_port, origin) == 200
    assert proxy.tunnels >= 1


async def test_a_pac_with_a_syntax_error_is_reported_and_the_agent_goes_direct(
    pki: PkiPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pac = tmp_path / "broken.pac"
    pac.write_text('function FindProxyForURL(url, host) { return "PROXY 127.0.0.1:9" ')
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(
            pki, server.port, upstream_pac=str(pac), tunnel={"connect_timeout": 15}
        ) as agent,
    ):
        assert await agent.tunnel.wait_connected(20), agent.tunnel.last_error
        assert await fetch_through(agent.proxy_port, origin) == 200
    lines = [r.getMessage() for r in caplog.records if "pac.unusable" in r.getMessage()]
    assert len(lines) == 1
    assert "SyntaxError" in lines[0] and "using=DIRECT" in lines[0] and str(pac) in lines[0]


async def test_a_pac_that_breaks_later_keeps_the_last_good_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pac(tmp_path / "p.pac", 'return "PROXY 127.0.0.1:3128; DIRECT";')
    pac = UpstreamPac(str(path), refresh=0)  # fetch again at every question
    first = await pac.routes_for("https://127.0.0.1:8443/", "127.0.0.1")
    path.write_text("function FindProxyForURL(url, host) { return ; ;; }}}")
    second = await pac.routes_for("https://127.0.0.1:8443/", "127.0.0.1")
    assert first == second
    assert isinstance(first[0], ProxyEndpoint) and first[0].port == 3128 and first[1] == DIRECT
    assert "the last good PAC" in caplog.text and pac.last_error


async def test_a_pac_that_never_returns_is_stopped_and_the_link_goes_direct(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pac(tmp_path / "loop.pac", "while (true) {}")
    pac = UpstreamPac(str(path), eval_timeout=1)
    assert await pac.routes_for("https://127.0.0.1:8443/", "127.0.0.1") == [DIRECT]
    assert "did not finish within 1s" in caplog.text


async def test_a_pac_that_cannot_be_fetched_is_reported(free_port: int) -> None:
    pac = UpstreamPac(f"http://127.0.0.1:{free_port}/proxy.pac", fetch_timeout=5)
    assert await pac.routes_for("https://127.0.0.1:8443/", "127.0.0.1") == [DIRECT]
    assert "cannot fetch it" in pac.last_error


# --- where the route comes from ------------------------------------------------------------------


def test_environment_proxy_is_used_unless_no_proxy_matches() -> None:
    env = {"HTTPS_PROXY": "http://u:p@proxy.corp.example:3128", "NO_PROXY": ".internal,10.0.0.0/8"}
    proxy = proxy_from_environment("203.0.113.7", 8443, env)
    assert proxy is not None and proxy.address == "proxy.corp.example:3128"
    assert proxy.credentials == Credentials("u", "p") and proxy.source == "HTTPS_PROXY"
    assert proxy_from_environment("10.1.2.3", 8443, env) is None
    assert proxy_from_environment("fluidity.internal", 8443, env) is None
    assert proxy_from_environment("127.0.0.1", 8443, env) is None  # loopback: always direct
    lower = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    chosen = proxy_from_environment("203.0.113.7", 8443, lower)
    assert chosen is not None and chosen.host == "lower"
    fallback = proxy_from_environment("203.0.113.7", 8443, {"http_proxy": "http://h:8080"})
    assert fallback is not None and fallback.source == "http_proxy"
    assert proxy_from_environment("203.0.113.7", 8443, {}) is None


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "anything", 1, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "a.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "b.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        ("192.168.0.0/16", "192.168.4.5", 8443, True),
        ("192.168.0.0/16", "192.169.0.1", 8443, False),
        (" , ", "example.com", 1, False),
    ],
)
def test_no_proxy_rules_match_like_curl(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert bypasses(no_proxy, host, port) is bypassed


def test_proxy_urls_are_checked_and_credentials_decoded() -> None:
    proxy = parse_proxy_url("http://CORP%5Calice:p%40ss@proxy:3128", "upstream_proxy")
    assert proxy.credentials == Credentials("CORP\\alice", "p@ss")
    with pytest.raises(ConfigError, match="https:// proxies are not supported"):
        parse_proxy_url("https://proxy:3128", "upstream_proxy")
    with pytest.raises(ConfigError, match="upstream_proxy: expected http://"):
        parse_proxy_url("http://proxy", "upstream_proxy")
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        parse_proxy_url("http://proxy:99999", "HTTPS_PROXY")


def test_challenges_are_parsed_one_per_field_and_comma_joined() -> None:
    found = parse_challenges(
        [b"NTLM", b'Basic realm="corp, inc", charset="UTF-8"', b"Negotiate abc=, NTLM"]
    )
    assert found == {"ntlm": "", "basic": 'realm="corp, inc", charset="UTF-8"', "negotiate": "abc="}


def test_the_agent_config_picks_the_route_source(pki: PkiPaths, tmp_path: Path) -> None:
    from fluidity.agent.frontends import upstream_connector

    from .helpers import agent_config

    env = {"HTTPS_PROXY": "http://proxy.corp.example:3128"}
    remote = {"server_ip": "203.0.113.7"}  # never dialled: only the route is computed
    from_env = upstream_connector(
        agent_config(pki, 8443, upstream={"use_environment": True}, **remote), env
    )
    assert from_env is not None and from_env.describe() == (
        "proxy proxy.corp.example:3128 (from HTTPS_PROXY)"
    )
    ignored = agent_config(pki, 8443, upstream={"use_environment": False}, **remote)
    assert upstream_connector(ignored, env) is None
    configured = agent_config(pki, 8443, upstream_proxy="http://p:1", **remote)
    connector = upstream_connector(configured, env)
    assert connector is not None and connector.describe() == "proxy p:1 (from upstream_proxy)"
    pac = agent_config(pki, 8443, upstream_pac=str(tmp_path / "x.pac"), **remote)
    by_pac = upstream_connector(pac, env)
    assert by_pac is not None and by_pac.describe().startswith("as the PAC at ")
    loopback = agent_config(pki, 8443, upstream={"use_environment": True})
    assert upstream_connector(loopback, env) is None
    with pytest.raises(ConfigError, match="upstream_proxy"):
        upstream_connector(agent_config(pki, 8443, upstream_proxy="socks5://p:1"), env)
