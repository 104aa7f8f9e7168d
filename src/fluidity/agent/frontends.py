"""The agent's client side, built from its config: who may connect, on which ports, in which
protocol, and what the agent answers about itself; plus the route its link takes to the server.

:class:`ClientSide` holds the HTTP proxy and SOCKS5 front ends behind one front door, proxy
authentication, and the status and PAC pages. :func:`check_exposure` refuses a non-loopback
address without proxy users unless ``allow_open_proxy`` says so. :func:`upstream_connector` picks
the link's route (``upstream_proxy``, ``upstream_pac``, the environment, or direct).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping

from fluidity.agent.auth import ProxyAuthenticator
from fluidity.agent.frontdoor import FrontDoor
from fluidity.agent.http_proxy import HttpProxy, ProxyLimits
from fluidity.agent.pac import UpstreamPac, normalise_host_rule
from fluidity.agent.socks5_frontend import Socks5Frontend
from fluidity.agent.status import AgentPages, AgentStatus, PacSettings
from fluidity.agent.streams import StreamOpener
from fluidity.agent.tunnel import Tunnel
from fluidity.agent.upstream import UpstreamConnector
from fluidity.agent.upstream_auth import Credentials
from fluidity.agent.upstream_routes import ProxyEndpoint, parse_proxy_url, proxy_from_environment
from fluidity.config import AgentConfig
from fluidity.errors import ConfigError
from fluidity.logs import log

logger = logging.getLogger("fluidity.agent")


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_exposure(config: AgentConfig) -> None:
    """Refuse a proxy reachable from other machines that anyone could use.

    A non-loopback ``local_proxy_addr`` needs ``proxy_auth.users`` or ``allow_open_proxy``.
    """
    if is_loopback(config.local_proxy_addr):
        return
    if config.proxy_auth.users or config.allow_open_proxy:
        return
    raise ConfigError(
        f"local_proxy_addr {config.local_proxy_addr} is not a loopback address: anyone who can "
        "reach it could use your tunnel. Bind 127.0.0.1, add proxy users (proxy_auth.users: "
        "[{username: ..., password: ...}]), or set allow_open_proxy: true if you really mean "
        "to share it with everyone"
    )


def warn_if_open(config: AgentConfig) -> None:
    """The warning an open proxy logs at every start."""
    if not is_loopback(config.local_proxy_addr) and not config.proxy_auth.users:
        log(logger, logging.WARNING, "agent.open_proxy", addr=config.local_proxy_addr,
            hint="allow_open_proxy is set and there are no proxy_auth users: anyone who can "
            "reach this address can use your tunnel")  # fmt: skip


def upstream_credentials(config: AgentConfig) -> Credentials:
    password = config.upstream.password
    return Credentials(
        config.upstream.username, password.get_secret_value() if password is not None else None
    )


def upstream_connector(
    config: AgentConfig, environ: Mapping[str, str] | None = None
) -> UpstreamConnector | None:
    """The link's connector through a corporate proxy, or ``None`` to connect directly.

    Raises :class:`ConfigError` for a malformed ``upstream_proxy`` or proxy variable.
    """
    assert config.server_ip is not None
    host, port = config.server_ip, config.server_port
    upstream = config.upstream
    proxy: ProxyEndpoint | None = None
    pac: UpstreamPac | None = None
    if config.upstream_proxy:
        proxy = parse_proxy_url(config.upstream_proxy, "upstream_proxy")
    elif config.upstream_pac:
        pac = UpstreamPac(
            config.upstream_pac,
            refresh=upstream.pac_refresh,
            fetch_timeout=upstream.pac_fetch_timeout,
            eval_timeout=upstream.pac_eval_timeout,
            max_bytes=upstream.max_pac_bytes,
        )
    elif upstream.use_environment:
        proxy = proxy_from_environment(host, port, os.environ if environ is None else environ)
    if proxy is None and pac is None:
        return None
    return UpstreamConnector(
        host,
        port,
        proxy=proxy,
        pac=pac,
        credentials=upstream_credentials(config),
        max_auth_rounds=upstream.max_auth_rounds,
        max_header_bytes=config.http.max_header_bytes,
    )


class ClientSide:
    """Proxy authentication, HTTP proxy, SOCKS5, the front door and the agent's own pages."""

    def __init__(
        self,
        config: AgentConfig,
        tunnel: Tunnel,
        limits: ProxyLimits,
        *,
        opener: StreamOpener | None = None,
        upstream: str = "direct",
        lifecycle: Callable[[], str | None] | None = None,
    ) -> None:
        self.config = config
        opener = opener or tunnel
        users = [(u.username, u.password.get_secret_value()) for u in config.proxy_auth.users]
        self.auth = ProxyAuthenticator(users, config.proxy_auth.realm)
        for rule in config.pac.direct_hosts:
            normalise_host_rule(rule)  # a bad rule is a config error at start, not a 500 later
        self.proxy = HttpProxy(
            opener,
            limits,
            authorizer=self.auth.authorize_proxy_request if self.auth.enabled else None,
        )
        socks = config.socks
        self.socks = (
            Socks5Frontend(
                opener,
                check_credentials=self.auth.check_socks if self.auth.enabled else None,
                handshake_timeout=socks.handshake_timeout,
                read_chunk=limits.read_chunk,
            )
            if socks.enabled
            else None
        )
        self.front = FrontDoor(
            self.proxy,
            self.socks,
            first_byte_timeout=limits.header_read_timeout,
            read_chunk=limits.read_chunk,
        )
        self.status = (
            AgentStatus(
                tunnel,
                self.front,
                auth=self.auth,
                upstream=upstream,
                recent_errors=config.status.recent_errors,
                lifecycle=lifecycle,
            )
            if config.status.enabled
            else None
        )
        pac = config.pac
        self.pages = AgentPages(
            self.status,
            PacSettings(
                enabled=pac.enabled,
                direct_private=pac.direct_private,
                direct_hosts=tuple(pac.direct_hosts),
                direct_cidrs=tuple(pac.direct_cidrs),
                proxy_address=pac.proxy_address,
            ),
            listening=self._listening,
            auth=self.auth if self.auth.enabled else None,
            allow_remote=config.status.allow_remote,
        )
        self.proxy.local_handler = self.pages

    def _listening(self) -> tuple[str, int]:
        addresses = self.proxy.addresses
        if addresses:
            return str(addresses[0][0]), int(addresses[0][1])
        return self.config.local_proxy_addr, self.config.local_proxy_port

    @property
    def proxy_port(self) -> int:
        return int(self.proxy.addresses[0][1])

    @property
    def socks_port(self) -> int | None:
        addresses = self.front.socks_addresses
        return int(addresses[0][1]) if addresses else None

    async def start(self) -> None:
        """Listen on ``local_proxy_port`` (and ``socks_port``); raise ConfigError if taken."""
        config = self.config
        host = config.local_proxy_addr
        for port, serve in (
            (config.local_proxy_port, self.front.serve),
            (config.socks_port, self.front.serve_socks if self.socks else None),
        ):
            if port is None or serve is None:
                continue
            try:
                await serve(host, port)
            except OSError as exc:
                await self.aclose()
                raise ConfigError(
                    f"cannot listen on {host}:{port}: {exc.strerror} (is another proxy or agent "
                    "running? set local_proxy_port / socks_port)"
                ) from None
        if self.status is not None:
            self.status.start()

    def close(self) -> None:
        """Stop accepting clients; connections already open carry on."""
        self.front.close()

    async def wait_connections_closed(self, timeout: float) -> bool:
        return await self.front.wait_connections_closed(timeout)

    async def aclose(self) -> None:
        """Close every client connection and listener; stop the status figures."""
        await self.front.aclose()
        if self.status is not None:
            self.status.stop()
