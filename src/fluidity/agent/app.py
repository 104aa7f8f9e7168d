"""The agent as a whole: the tunnel to the server plus the local HTTP proxy in front of it."""

from __future__ import annotations

import ipaddress
import logging

from fluidity.agent.http_proxy import HttpProxy, ProxyLimits
from fluidity.agent.tunnel import Tunnel
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
    )


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Agent:
    """Tunnel + proxy with a start/stop life cycle (used by ``fluidity agent`` and the tests)."""

    def __init__(self, config: AgentConfig) -> None:
        if not config.server_ip:
            raise ConfigError(
                "no server address: set server_ip in the agent config or pass --server-ip "
                "(for a Fargate server, `fluidity cloud start` prints it)"
            )
        if not _is_loopback(config.local_proxy_addr) and not config.allow_non_loopback:
            raise ConfigError(
                f"local_proxy_addr {config.local_proxy_addr} is not a loopback address: anyone "
                "who can reach it could use your tunnel. Bind 127.0.0.1, or set "
                "allow_non_loopback: true if you really mean to share it"
            )
        self.config = config
        context = client_context(config.cert_file, config.key_file, config.ca_cert_file)
        self.tunnel = Tunnel(
            config.server_ip, config.server_port, config.server_name, context, config.tunnel
        )
        self.proxy = HttpProxy(self.tunnel, proxy_limits(config))

    @property
    def proxy_port(self) -> int:
        return int(self.proxy.addresses[0][1])

    async def start(self) -> None:
        config = self.config
        if not _is_loopback(config.local_proxy_addr):
            log(logger, logging.WARNING, "agent.open_proxy",
                addr=config.local_proxy_addr,
                hint="the proxy is reachable from other machines")  # fmt: skip
        self.tunnel.start()
        try:
            await self.proxy.serve(config.local_proxy_addr, config.local_proxy_port)
        except OSError as exc:
            await self.tunnel.stop()
            raise ConfigError(
                f"cannot listen on {config.local_proxy_addr}:{config.local_proxy_port}: "
                f"{exc.strerror} (is another proxy or agent running? set local_proxy_port)"
            ) from None
        log(logger, logging.INFO, "agent.listening",
            proxy=f"http://{config.local_proxy_addr}:{self.proxy_port}",
            server=self.tunnel.address, server_name=config.server_name)  # fmt: skip

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting clients; give open connections ``grace`` seconds; close everything."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.proxy.close()
        if grace > 0:
            await self.proxy.wait_connections_closed(grace)
        await self.proxy.aclose()
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
