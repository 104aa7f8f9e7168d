"""The agent as a whole: the tunnel to the server plus the local proxy (HTTP, SOCKS5) in front."""

from __future__ import annotations

import logging
from functools import partial
from typing import cast

from fluidity.agent.fdlimit import connection_budget
from fluidity.agent.frontends import ClientSide, check_exposure, upstream_connector, warn_if_open
from fluidity.agent.http_proxy import ProxyLimits
from fluidity.agent.lifecycle import Lifecycle
from fluidity.agent.tunnel import Connector, Tunnel
from fluidity.config import AgentConfig
from fluidity.errors import ConfigError
from fluidity.logs import log
from fluidity.runtime import shutdown_event
from fluidity.tls import client_context

logger = logging.getLogger("fluidity.agent")


def proxy_limits(config: AgentConfig) -> ProxyLimits:
    http = config.http
    return ProxyLimits(
        max_header_bytes=http.max_header_bytes,
        max_request_line=http.max_request_line,
        max_headers=http.max_headers,
        header_read_timeout=http.header_read_timeout,
        idle_timeout=http.idle_timeout,
        read_chunk=http.read_chunk,
        max_connections=http.max_connections or connection_budget(),
    )


def _connector(config: AgentConfig, host: str) -> Connector | None:
    """The link's connector for a server address the control plane reported."""
    return upstream_connector(config.model_copy(update={"server_ip": host}))


class Agent:
    """Tunnel + proxy with a start/stop life cycle (used by ``fluidity agent`` and the tests)."""

    def __init__(self, config: AgentConfig) -> None:
        if not config.server_ip and not config.lifecycle.enabled:
            raise ConfigError(
                "no server address: set server_ip in the agent config or pass --server-ip "
                "(for a Fargate server, `fluidity cloud start` prints it)"
            )
        check_exposure(config)
        self.config = config
        context = client_context(config.cert_file, config.key_file, config.ca_cert_file)
        connector = upstream_connector(config) if config.server_ip else None
        self.lifecycle: Lifecycle | None = None
        if config.lifecycle.enabled:
            # Wake the server through the control plane, learn its address, release it on exit;
            # Lifecycle offers the Tunnel interface the proxy and the status pages use.
            self.lifecycle = Lifecycle(config, context, connector_for=partial(_connector, config))
            self.tunnel = cast(Tunnel, self.lifecycle)
        else:
            assert config.server_ip is not None
            self.tunnel = Tunnel(
                config.server_ip, config.server_port, config.server_name, context,
                config.tunnel, connector=connector,
            )  # fmt: skip
        self.route = connector.describe() if connector is not None else "direct"
        phase = (lambda: lifecycle.phase) if (lifecycle := self.lifecycle) is not None else None
        # HTTP proxy and SOCKS5 on one port, proxy authentication, status and PAC pages.
        self.clients = ClientSide(
            config, self.tunnel, proxy_limits(config), upstream=self.route, lifecycle=phase
        )
        self.proxy = self.clients.proxy

    @property
    def proxy_port(self) -> int:
        return int(self.proxy.addresses[0][1])

    async def start(self) -> None:
        config = self.config
        warn_if_open(config)
        await self.clients.start()  # first, so the status page sees the link's first events
        self.tunnel.start()
        log(logger, logging.INFO, "agent.listening",
            proxy=f"http://{config.local_proxy_addr}:{self.proxy_port}",
            socks_port=self.clients.socks_port or "-",
            server=self.tunnel.address, server_name=config.server_name,
            via=self.route)  # fmt: skip

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting clients; give open connections ``grace`` seconds; close everything."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.clients.close()
        if grace > 0:
            await self.clients.wait_connections_closed(grace)
        await self.clients.aclose()
        await self.tunnel.stop()
        log(logger, logging.INFO, "agent.stopped")


async def run_agent(config: AgentConfig) -> None:
    """Run the agent until SIGINT/SIGTERM, then shut down within ``shutdown_grace``."""
    agent = Agent(config)
    stop = shutdown_event()
    await agent.start()
    await stop.wait()
    log(logger, logging.INFO, "agent.stopping", grace=f"{config.shutdown_grace:g}s")
    await agent.stop()
