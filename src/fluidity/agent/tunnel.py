"""The agent's tunnel: keeps ``tunnel.connections`` links to the server and opens streams on them.

Each link slot runs a loop: connect (TCP, TLS 1.3 with the fixed server name, HELLO), serve until
the link dies, then reconnect with exponential backoff and jitter. One log line per state change
(``link.up``, ``link.down``, ``link.retrying`` at debug), never one per retry at info.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from fluidity.agent.link import AgentLink, LinkStream
from fluidity.agent.streams import OpenFailure, StreamOpenError
from fluidity.config import TunnelConfig
from fluidity.logs import log
from fluidity.tls import explain_handshake_error, prime_malloc_for_tls_reads
from fluidity.wire import ALPN, SessionSettings, SessionStateError

logger = logging.getLogger("fluidity.agent")


#: Opens the TCP connection a link runs over (e.g. through a corporate proxy: see
#: :mod:`fluidity.agent.upstream`); without one, the tunnel connects straight to the server. Its
#: errors (``OSError``/``ConnectionError``) are logged as ``link.down reason=<message>``.
Connector = Callable[[], Awaitable[socket.socket]]


def backoff_delays(config: TunnelConfig, rng: Callable[[], float] = random.random) -> list[float]:
    """The first few reconnect delays (seconds) the config implies, for docs and tests."""
    delays, delay = [], config.reconnect_initial
    for _ in range(8):
        delays.append(_jittered(delay, config.reconnect_jitter, rng))
        delay = min(config.reconnect_max, delay * config.reconnect_multiplier)
    return delays


def _jittered(delay: float, jitter: float, rng: Callable[[], float]) -> float:
    return max(0.0, delay * (1 + jitter * (2 * rng() - 1)))


class Tunnel:
    """A :class:`~fluidity.agent.streams.StreamOpener` over a pool of links to one server."""

    def __init__(
        self,
        host: str,
        port: int,
        server_name: str,
        ssl_context: ssl.SSLContext,
        config: TunnelConfig,
        *,
        connector: Connector | None = None,
    ) -> None:
        self.host = host
        self.connector = connector
        self.port = port
        self.server_name = server_name
        self.ssl_context = ssl_context
        self.config = config
        self.settings = SessionSettings(
            initial_window=config.stream_window,
            max_frame_size=config.max_frame_size,
            max_window=config.max_stream_window,
            window_growth_budget=config.stream_window_budget,
        )
        self.links: list[AgentLink] = []
        self.state = "connecting"  # connecting | connected | reconnecting | stopped
        self.last_error = ""
        self._available = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        prime_malloc_for_tls_reads()
        loop = asyncio.get_running_loop()
        for slot in range(self.config.connections):
            self._tasks.append(loop.create_task(self._keep_link(slot)))

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a usable link; return whether one is up."""
        if self._pick() is not None:
            return True
        self._available.clear()  # it stays set after a link is lost
        try:
            await asyncio.wait_for(self._available.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def open(self, host: str, port: int) -> LinkStream:
        """Open a stream on the least busy usable link, waiting up to ``link_wait_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.link_wait_timeout
        while True:
            link = self._pick()
            if link is not None:
                try:
                    return link.open_stream(host, port)
                except ValueError as exc:
                    raise StreamOpenError(OpenFailure.ERROR, f"invalid target: {exc}") from None
                except SessionStateError:
                    link.mark_draining()  # raced with GOAWAY or a protocol error
                    continue
            remaining = deadline - loop.time()
            if self._stopping or remaining <= 0:
                reason = f" (last error: {self.last_error})" if self.last_error else ""
                raise StreamOpenError(
                    OpenFailure.TUNNEL_DOWN,
                    f"no link to the server at {self.address}{reason}",
                )
            self._available.clear()
            try:
                await asyncio.wait_for(self._available.wait(), remaining)
            except TimeoutError:
                continue

    def open_now(self, host: str, port: int) -> LinkStream | None:
        """Open a stream on the least busy usable link if there is one, without waiting;
        ``None`` when none is up or the target is invalid (:meth:`open` then says why)."""
        while (link := self._pick()) is not None:
            try:
                return link.open_stream(host, port)
            except ValueError:
                return None
            except SessionStateError:
                link.mark_draining()  # raced with GOAWAY or a protocol error
        return None

    def _pick(self) -> AgentLink | None:
        usable = [link for link in self.links if link.usable]
        if not usable:
            return None
        return min(usable, key=lambda link: len(link.streams))

    @property
    def open_streams(self) -> int:
        return sum(len(link.streams) for link in self.links)

    async def _keep_link(self, slot: int) -> None:
        config = self.config
        delay = config.reconnect_initial
        failures = 0
        while not self._stopping:
            try:
                link = await self._connect()
            except (OSError, TimeoutError, ConnectionError) as exc:
                failures += 1
                reason = _describe(exc)
                if reason != self.last_error or failures == 1:
                    log(logger, logging.WARNING, "link.down", server=self.address,
                        reason=reason, retry_in=f"{delay:.1f}s")  # fmt: skip
                else:
                    log(logger, logging.DEBUG, "link.retrying", server=self.address,
                        reason=reason, attempt=failures)  # fmt: skip
                self.last_error = reason
                self._set_state("reconnecting")
                if config.reconnect_max_attempts and failures >= config.reconnect_max_attempts:
                    log(logger, logging.ERROR, "link.gave_up", server=self.address,
                        attempts=failures)  # fmt: skip
                    return
                await asyncio.sleep(_jittered(delay, config.reconnect_jitter, random.random))
                delay = min(config.reconnect_max, delay * config.reconnect_multiplier)
                continue
            failures = 0
            delay = config.reconnect_initial
            self.links.append(link)
            self.last_error = ""
            self._set_state("connected")
            log(logger, logging.INFO, "link.up", server=self.address, slot=slot,
                server_name=self.server_name)  # fmt: skip
            self._available.set()
            # A GOAWAY makes the link stop taking streams: start its successor at once.
            await link.retired
            if not link.closed.done():
                self._retire(link)
            else:
                self.links.remove(link)
                self.last_error = link.closed.result()
                if not self._stopping:
                    log(logger, logging.WARNING, "link.down", server=self.address,
                        reason=self.last_error)  # fmt: skip
            if not any(item.usable for item in self.links):
                self._set_state("reconnecting")

    def _retire(self, link: AgentLink) -> None:
        """Keep a draining link until its streams finish, without blocking the slot."""

        def forget(_: asyncio.Future[str]) -> None:
            if link in self.links:
                self.links.remove(link)

        link.closed.add_done_callback(forget)

    async def _connect(self) -> AgentLink:
        loop = asyncio.get_running_loop()
        config = self.config
        link = AgentLink(
            self.settings,
            stream_buffer=config.stream_buffer,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
            name=self.address,
        )
        async with asyncio.timeout(config.connect_timeout):
            where: dict[str, Any] = {"host": self.host, "port": self.port}
            if self.connector is not None:
                where = {"sock": await self.connector()}
            transport, _ = await loop.create_connection(
                lambda: link, **where,
                ssl=self.ssl_context, server_hostname=self.server_name,
                ssl_handshake_timeout=config.connect_timeout,
            )  # fmt: skip
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                transport.abort()
                raise ConnectionError(f"server at {self.address} does not speak {ALPN}")
            try:
                await link.ready
            except ConnectionError:
                # TLS 1.3 checks the client certificate after the client's handshake is done,
                # so a refusal shows up here as a closed link, not as a handshake error.
                reason = link.close_reason or (
                    "server closed the link before HELLO: it may have refused this "
                    "agent's certificate; the server's log names the reason"
                )
                raise ConnectionError(reason) from None
        if link.draining:
            link.close()
            raise ConnectionError(link.close_reason)
        return link

    def _set_state(self, state: str) -> None:
        self.state = state

    async def stop(self, grace: float = 0.0) -> None:
        """Stop reconnecting; give open streams ``grace`` seconds, then close every link."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        links = list(self.links)
        for link in links:
            link.mark_draining()  # closes each link as soon as its last stream finishes
        if links and grace > 0:
            await asyncio.wait([link.closed for link in links], timeout=grace)
        for link in links:
            link.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.state = "stopped"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return explain_handshake_error(exc)
    if isinstance(exc, TimeoutError):
        return "timed out connecting (TCP, TLS or HELLO)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running and the port open?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
