"""The server: accepts agents over mutual TLS 1.3 and runs one :class:`ServerLink` per agent.

Connections are accepted by hand and given to ``loop.connect_accepted_socket(ssl=...)``, which
raises a failed handshake (no client certificate, unknown CA, expired certificate, plain bytes)
to us, so it is logged with the peer and the reason; ``create_server(ssl=...)`` only logs those
at debug level, and uvloop's ``start_tls`` does not work on the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Coroutine, Iterator
from typing import Any

from fluidity.config import EgressConfig, ServerConfig
from fluidity.crl import RevocationList, revoked_reason
from fluidity.errors import ConfigError
from fluidity.logs import log
from fluidity.server.egress import EgressPolicy
from fluidity.server.link import ServerLink
from fluidity.server.stats import ServerStats
from fluidity.tls import explain_handshake_error, peer_identity, prime_malloc_for_tls_reads
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
        self.ssl_context = ssl_context  # replaced on reload: new handshakes use the new one
        self.revocations: RevocationList | None = None  # set by TlsReloader from crl_file
        self.policy = policy_from_config(config)
        self.session_settings = SessionSettings(
            initial_window=config.stream_window,
            max_frame_size=config.max_frame_size,
            max_streams=config.max_streams_per_connection,
            max_window=config.max_stream_window,
            window_growth_budget=config.stream_window_budget,
        )
        self.links: set[ServerLink] = set()
        self.stats = ServerStats(self._link_totals)
        self._handshaking = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _link_totals(self) -> Iterator[tuple[int, int]]:
        for link in self.links:
            yield link.session.bytes_received, link.session.bytes_sent

    @property
    def port(self) -> int:
        """The bound port (useful when ``listen_port`` is 0)."""
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def accepting(self) -> bool:
        """True while the listening socket is open and its accept loop runs (the health check)."""
        task, listener = self._accept_task, self._listener
        return (
            task is not None and not task.done() and listener is not None and listener.fileno() >= 0
        )

    async def start(self) -> None:
        """Bind ``listen_addr:listen_port`` and start accepting agents."""
        prime_malloc_for_tls_reads()
        config = self.config
        try:
            family = socket.AF_INET6 if ":" in config.listen_addr else socket.AF_INET
            self._listener = socket.create_server(
                (config.listen_addr, config.listen_port), family=family, backlog=1024
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.listen_addr}:{config.listen_port}: {exc.strerror} "
                "(is another server running? set listen_port)"
            ) from None
        self._listener.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        log(logger, logging.INFO, "server.listening",
            addr=f"{config.listen_addr}:{self.port}",
            max_connections=config.max_connections)  # fmt: skip

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        pause = 0.05
        while True:
            try:
                conn, address = await loop.sock_accept(self._listener)
            except OSError as exc:
                # Out of file descriptors (EMFILE/ENFILE) and the like: say so once per pause
                # and back off instead of spinning; accepting resumes when descriptors free up.
                log(logger, logging.ERROR, "server.accept_failed", reason=exc.strerror,
                    retry_in=f"{pause:g}s")  # fmt: skip
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
                continue
            pause = 0.05
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which an
            # accepted socket is not (uvloop sets it always): without it a small frame waits
            # for the agent's delayed ACK, 40 ms per new tunnel.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(self._handshake(conn, f"{address[0]}:{address[1]}"))

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        """Run the TLS handshake; the link admits itself in ``connection_made``.

        A connection that closes before sending a single byte is a port probe (a TCP health
        check, ``fluidity up`` waiting for the port, a scanner), not a failed handshake: it is
        logged at debug level only, so load-balancer health checks do not flood the log.
        ``handshake_timeout`` covers the wait for the first byte and the handshake together.
        """
        loop = asyncio.get_running_loop()
        link = ServerLink(self, peer, identity="unknown")
        deadline = loop.time() + self.config.handshake_timeout
        try:
            async with asyncio.timeout_at(deadline):
                if not await _first_byte_arrives(loop, conn):
                    log(logger, logging.DEBUG, "link.probe", peer=peer)
                    conn.close()
                    return
            await loop.connect_accepted_socket(
                lambda: link, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=max(0.001, deadline - loop.time()),
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            log(logger, logging.WARNING, "link.handshake_failed", peer=peer,
                reason=explain_handshake_error(exc))  # fmt: skip
            conn.close()

    def admit(self, link: ServerLink, transport: asyncio.Transport) -> bool:
        """Check a freshly authenticated link (ALPN, connection limit); refuse it with a reason."""
        ssl_object = transport.get_extra_info("ssl_object")
        link.identity = peer_identity(ssl_object)
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            log(logger, logging.WARNING, "link.refused", peer=link.peer, agent=link.identity,
                reason=f"client did not negotiate ALPN {ALPN!r}")  # fmt: skip
            transport.abort()
            return False
        if revoked := revoked_reason(self.revocations, ssl_object):
            log(logger, logging.WARNING, "link.refused", peer=link.peer, agent=link.identity,
                reason=revoked)  # fmt: skip
            transport.abort()
            return False
        limit = self.config.max_connections
        if len(self.links) >= limit:
            log(logger, logging.WARNING, "link.refused", peer=link.peer, agent=link.identity,
                reason=f"max_connections={limit} reached")  # fmt: skip
            link.session.send_goaway(
                ErrorCode.LIMIT, f"server already has max_connections={limit} agent links"
            )
            transport.write(link.session.data_to_send())
            transport.close()
            return False
        self.links.add(link)
        self.stats.active_connections = len(self.links)
        log(logger, logging.INFO, "link.up", peer=link.peer, agent=link.identity,
            links=len(self.links))  # fmt: skip
        return True

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
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        links = list(self.links)
        for link in links:
            link.goaway("server shutting down")  # the link closes when its last stream ends
        if links and grace > 0:
            await asyncio.wait([link.closed for link in links], timeout=grace)
        for link in links:
            link.close()
        for task in list(self._tasks):
            task.cancel()
        log(logger, logging.INFO, "server.stopped")


async def _first_byte_arrives(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bool:
    """Wait until ``conn`` is readable; True if data waits, False if the peer closed unheard.

    The byte is only peeked at, so the TLS handshake still reads the whole ClientHello.
    """
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return True  # readable yet nothing to read: let the handshake decide
    except ConnectionResetError:
        return False  # reset before a byte: a probe that aborts instead of closing
