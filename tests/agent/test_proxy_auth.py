"""Proxy authentication for an agent shared on a LAN: Basic over HTTP, checks, exposure rules."""

from __future__ import annotations

import base64
import logging

import pytest

from fluidity.agent.auth import ProxyAuthenticator, parse_basic
from fluidity.agent.frontends import check_exposure, warn_if_open
from fluidity.certs import PkiPaths
from fluidity.errors import ConfigError

from ..integration.origins import HttpOrigin
from ..integration.stack import running_server
from .helpers import agent_config, curl, running_agent

pytestmark = pytest.mark.timeout(60)

USERS = {
    "users": [{"username": "alice", "password": "s3cret"}, {"username": "bob", "password": "pw"}]
}


async def test_http_clients_must_send_proxy_authorization_when_users_are_configured(
    pki: PkiPaths,
) -> None:
    async with (
        HttpOrigin() as origin,
        running_server(pki) as server,
        running_agent(pki, server.port, proxy_auth=USERS) as agent,
    ):
        proxy = ["-x", f"http://127.0.0.1:{agent.proxy_port}"]
        missing = await curl("-sS", "-i", *proxy, origin.url("/none"))
        wrong = await curl("-sS", "-i", *proxy, "--proxy-user", "alice:nope", origin.url("/wrong"))
        good = await curl("-sS", *proxy, "--proxy-user", "bob:pw", origin.url("/good"))
        # CONNECT too (curl -p tunnels through the proxy even for http://)
        tunnel = await curl(
            "-sS", "-p", *proxy, "--proxy-user", "alice:s3cret", origin.url("/tunnel")
        )
        tunnel_refused = await curl("-sS", "-p", *proxy, origin.url("/refused"))
        failures = agent.clients.auth.failures
    assert missing.stdout.startswith(b"HTTP/1.1 407")
    assert b'Proxy-Authenticate: Basic realm="fluidity", charset="UTF-8"' in missing.stdout
    assert b"curl --proxy-user" in missing.stdout
    assert wrong.stdout.startswith(b"HTTP/1.1 407")
    assert good.returncode == 0 and good.json()["target"] == "/good"
    assert tunnel.returncode == 0 and tunnel.json()["target"] == "/tunnel"
    assert tunnel_refused.returncode != 0 and b"407" in tunnel_refused.stderr
    # The credentials never reach the origin.
    headers = [h.lower() for r in origin.requests for h, _ in r.headers]
    assert "proxy-authorization" not in headers
    assert [r.target for r in origin.requests] == ["/good", "/tunnel"]
    assert failures == 1  # only the wrong password counts; a missing header is a normal first try


async def test_the_status_page_needs_no_proxy_login_on_this_machine(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        running_agent(pki, server.port, proxy_auth=USERS) as agent,
    ):
        result = await curl("-sS", f"http://127.0.0.1:{agent.proxy_port}/status")
    assert result.returncode == 0 and result.json()["link"]["state"] in ("connected", "connecting")


def test_credentials_are_checked_against_every_user() -> None:
    auth = ProxyAuthenticator([("alice", "s3cret"), ("bob", "pw")])
    assert auth.enabled
    assert auth.check(b"alice", b"s3cret") and auth.check(b"bob", b"pw")
    assert not auth.check(b"alice", b"pw")  # another user's password
    assert not auth.check(b"alice", b"s3cret ")
    assert not auth.check(b"", b"")
    assert not ProxyAuthenticator([]).enabled


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Basic " + base64.b64encode(b"alice:s3:cret"), (b"alice", b"s3:cret")),
        (b"basic   " + base64.b64encode(b"a:"), (b"a", b"")),
        (b"Basic " + base64.b64encode(b"no-colon"), None),
        (b"Basic not*base64", None),
        (b"Bearer abc", None),
        (b"", None),
    ],
)
def test_basic_credentials_are_parsed_strictly(
    value: bytes, expected: tuple[bytes, bytes] | None
) -> None:
    assert parse_basic(value) == expected


def test_two_proxy_authorization_headers_are_refused() -> None:
    auth = ProxyAuthenticator([("alice", "s3cret")])
    good = b"Basic " + base64.b64encode(b"alice:s3cret")
    assert auth.authorize_proxy_request([(b"proxy-authorization", good)]) is None
    refusal = auth.authorize_proxy_request(
        [(b"proxy-authorization", good), (b"proxy-authorization", good)]
    )
    assert refusal is not None and refusal.status == 407


def test_a_lan_address_needs_users_or_an_explicit_open_proxy(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="anyone who can reach it could use your tunnel"):
        check_exposure(agent_config(pki, 8443, local_proxy_addr="0.0.0.0"))
    check_exposure(agent_config(pki, 8443, local_proxy_addr="0.0.0.0", proxy_auth=USERS))
    open_proxy = agent_config(pki, 8443, local_proxy_addr="0.0.0.0", allow_open_proxy=True)
    check_exposure(open_proxy)
    caplog.set_level(logging.WARNING, logger="fluidity")
    warn_if_open(open_proxy)
    warn_if_open(open_proxy)  # at every start
    warn_if_open(agent_config(pki, 8443, local_proxy_addr="0.0.0.0", proxy_auth=USERS))
    warn_if_open(agent_config(pki, 8443))
    warnings = [r for r in caplog.records if r.getMessage().startswith("agent.open_proxy")]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert "anyone who can reach this address" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"username": "a:b", "password": "x"}, "no ':'"),
        ({"username": "", "password": "x"}, "1 to 255 bytes"),
        ({"username": "a", "password": "x" * 256}, "SOCKS5 limit"),
    ],
)
def test_bad_proxy_users_are_config_errors(
    pki: PkiPaths, user: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        agent_config(pki, 8443, proxy_auth={"users": [user]})
