"""The server: accepts agents over mutual TLS 1.3 and runs one :class:`ServerLink` per agent.

TLS is started explicitly after the TCP accept (``loop.start_tls``) rather than by
``create_server(ssl=...)`` so that a failed handshake (no client certificate, unknown CA,
expired certificate, plain bytes) is logged here with the peer and the reason; asyncio's own
server only logs those at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine, Iterator
from typing import Any

from fluidity.config import EgressConfig, ServerConfig
from fluidity.errors import ConfigError
from fluidity.logs import log
from fluidity.server.egress import EgressPolicy
from fluidity.server.link import ServerLink
from fluidity.server.stats import ServerStats
from fluidity.tls import explain_handshake_error, peer_identity
from fluidity.wire import ALPN, ErrorCode, SessionSettings

logger = logging.getLogger("fluidity.server")


def policy_from_config(config: ServerConfig) -> EgressPolicy:
    """Build the egress policy; a bad list entry is a :class:`ConfigError` naming it."""
    egress = config.egress
    try:
        return _policy(egress)
    except ValueError as exc:
        raise ConfigError(f"invalid egress policy: {exc}") from None


def _policy(egress: EgressConfig) -> EgressPolicy:
    return EgressPolicy.from_lists(
        default_deny_ranges=egress.default_deny_ranges,
        allow_cidrs=egress.allow_cidrs,
        deny_cidrs=egress.deny_cidrs,
        allow_hosts=egress.allow_hosts,
        deny_hosts=egress.deny_hosts,
        allow_ports=egress.allow_ports,
        deny_ports=egress.deny_ports,
    )


class Server:
    """Listens for agent links; see :mod:`fluidity.server.link` for what a link does."""

    def __init__(self, config: ServerConfig, ssl_context: ssl.SSLContext) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.policy = policy_from_config(config)
        self.session_settings = SessionSettings(
            initial_window=config.stream_window,
            max_frame_size=config.max_frame_size,
            max_streams=config.max_streams_per_connection,
        )
        self.links: set[ServerLink] = set()
        self.stats = ServerStats(self._link_totals)
        self._handshaking = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _link_totals(self) -> Iterator[tuple[int, int]]:
        for link in self.links:
            yield link.session.bytes_received, link.session.bytes_sent

    @property
    def port(self) -> int:
        """The bound port (useful when ``listen_port`` is 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Handshake(self),
            self.config.listen_addr,
            self.config.listen_port,
            backlog=1024,
        )
        log(logger, logging.INFO, "server.listening",
            addr=f"{self.config.listen_addr}:{self.port}",
            max_connections=self.config.max_connections)  # fmt: skip

    async def upgrade(self, transport: asyncio.Transport, peer: str) -> None:
        """Run the TLS handshake on a fresh TCP connection and start its link."""
        loop = asyncio.get_running_loop()
        link = ServerLink(self, peer, identity="unknown")
        self._handshaking += 1
        try:
            tls_transport = await loop.start_tls(
                transport, link, self.ssl_context, server_side=True,
                ssl_handshake_timeout=self.config.handshake_timeout,
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            log(logger, logging.WARNING, "link.handshake_failed", peer=peer,
                reason=explain_handshake_error(exc))  # fmt: skip
            transport.abort()
            return
        finally:
            self._handshaking -= 1
        if tls_transport is None:  # the peer went away during the handshake
            transport.abort()
            return
        ssl_object = tls_transport.get_extra_info("ssl_object")
        link.identity = peer_identity(ssl_object)
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            log(logger, logging.WARNING, "link.refused", peer=peer, agent=link.identity,
                reason=f"client did not negotiate ALPN {ALPN!r}")  # fmt: skip
            tls_transport.abort()
            return
        if len(self.links) >= self.config.max_connections:
            log(logger, logging.WARNING, "link.refused", peer=peer, agent=link.identity,
                reason=f"max_connections={self.config.max_connections} reached")  # fmt: skip
            link.session.send_goaway(
                ErrorCode.LIMIT,
                f"server already has max_connections={self.config.max_connections} agent links",
            )
            link.connection_made(tls_transport)
            tls_transport.close()
            return
        self.links.add(link)
        self.stats.active_connections = len(self.links)
        log(logger, logging.INFO, "link.up", peer=peer, agent=link.identity,
            links=len(self.links))  # fmt: skip
        link.connection_made(tls_transport)

    def link_closed(self, link: ServerLink) -> None:
        if link in self.links:
            self.links.discard(link)
            self.stats.active_connections = len(self.links)
            self.stats.link_closed(link.session.bytes_received, link.session.bytes_sent)
            log(logger, logging.INFO, "link.down", peer=link.peer, agent=link.identity,
                links=len(self.links))  # fmt: skip

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, send GOAWAY, let streams finish for ``grace`` seconds, then close."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        links = list(self.links)
        for link in links:
            link.goaway("server shutting down")  # the link closes when its last stream ends
        if links and grace > 0:
            await asyncio.wait([link.closed for link in links], timeout=grace)
        for link in links:
            link.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        log(logger, logging.INFO, "server.stopped")


class _Handshake(asyncio.Protocol):
    """Owns a new TCP connection only until :meth:`Server.upgrade` starts TLS on it."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Nothing may be read before start_tls takes the transport over.
        transport.pause_reading()
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        self.server.spawn(self.server.upgrade(transport, peer))

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass
