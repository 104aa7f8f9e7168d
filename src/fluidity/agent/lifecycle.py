"""The agent's side of the control plane: wake the server, find its address, release it on exit.

With ``lifecycle.enabled`` the agent's stream opener is a :class:`Lifecycle` instead of a bare
:class:`~fluidity.agent.tunnel.Tunnel`:

* **On start** it calls ``POST /wake`` and at once starts connecting: to ``server_ip`` if set,
  else to the ``public_ip`` the wake or ``GET /status`` answers report (a Fargate task gets a new
  one at every start). Status polls and link attempts start a quarter second apart and back off
  to ``connection_retry_interval``; the link is up as soon as the server listens. Progress is
  logged (``lifecycle.waking``, ``lifecycle.waiting`` every ``PROGRESS_EVERY`` seconds,
  ``lifecycle.ready`` with the time it took) and readable from :meth:`Lifecycle.status`.
* **While waking**, a client request waits up to ``tunnel.link_wait_timeout`` for the link, then
  gets 503 with "server is waking up" (never a hang).
* **On demand**: once the server was put to sleep (the link dropped and status says stopped),
  the tunnel is closed; the next client request wakes the server again.
* **On exit** it sends ``POST /kill`` with ``{"mode": "release", "agent_id": <certificate CN>}``
  (``on_exit: release``), so the server stops unless another agent is using it.

Control-API failures (network, 5xx) are retried with backoff up to ``connection_max_retries``;
refusals that retrying cannot fix (403 wrong key, 404 wrong URL) stop the wake at once with a
message saying what to fix. The control API is reached through ``upstream_proxy`` when it is an
``http://`` proxy, else through the environment's proxy variables, except a proxy that is this
agent itself (``https_proxy=http://127.0.0.1:8080`` in the shell would otherwise loop).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from fluidity.agent.control_client import ControlApiError, ControlClient, control_api_opener
from fluidity.agent.link import AgentLink, LinkStream
from fluidity.agent.streams import OpenFailure, StreamOpenError
from fluidity.agent.tunnel import Connector, Tunnel
from fluidity.config import AgentConfig
from fluidity.logs import log

logger = logging.getLogger("fluidity.agent.lifecycle")

FIRST_RETRY = 0.25
"""First pause (seconds) between status polls, link waits and control-API retries."""
PROGRESS_EVERY = 10.0
"""Seconds between ``lifecycle.waiting`` progress lines while the server wakes."""


def agent_id_of(config: AgentConfig) -> str:
    """This agent's id for the control plane: its certificate's common name."""
    # Imported here: cryptography costs about 10 MiB of RSS, and only a lifecycle agent needs it.
    from cryptography import x509

    from fluidity.certs import common_name

    try:
        cert = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
    except (OSError, ValueError):
        return "unknown"
    return common_name(cert.subject) or "unknown"


class Lifecycle:
    """A stream opener that wakes the server on demand; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        ssl_context: ssl.SSLContext,
        *,
        client: ControlClient | None = None,
        connector_for: Callable[[str], Connector | None] | None = None,
    ) -> None:
        self.config = config
        self.lifecycle = config.lifecycle
        self.client = client or ControlClient(config.lifecycle, control_api_opener(config))
        self._connector_for = connector_for
        self.ssl_context = ssl_context
        self.agent_id = agent_id_of(config)
        retry = self.lifecycle.connection_retry_interval
        # While waking, a link attempt at least every connection_retry_interval.
        self.tunnel_config = config.tunnel.model_copy(
            update={"reconnect_max": min(config.tunnel.reconnect_max, retry)}
        )
        self.tunnel: Tunnel | None = None
        self.phase = "idle"  # idle | waking | connected | asleep | failed
        self.server_state: str | None = None
        self.public_ip: str | None = None
        self.last_error = ""
        self.wake_seconds: float | None = None  # how long the last wake took, for status/logs
        self._wake_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._tunnel_event = asyncio.Event()
        self._next_wake = 0.0
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()

    # --- what the agent and the front ends use ---------------------------------------------------

    @property
    def address(self) -> str:
        host = self.config.server_ip or self.public_ip or "(address from the control plane)"
        return f"{host}:{self.config.server_port}"

    @property
    def server_name(self) -> str:
        return self.config.server_name

    @property
    def state(self) -> str:
        return self.tunnel.state if self.tunnel is not None else self.phase

    @property
    def links(self) -> list[AgentLink]:
        return self.tunnel.links if self.tunnel is not None else []

    @property
    def open_streams(self) -> int:
        return self.tunnel.open_streams if self.tunnel is not None else 0

    def status(self) -> dict[str, Any]:
        """For a status page: phase, server state, address, last error, last wake duration."""
        return {
            "phase": self.phase,
            "server_state": self.server_state,
            "server": self.address,
            "message": self.waiting_message() if self.phase != "connected" else "",
            "last_error": self.last_error,
            "wake_seconds": self.wake_seconds,
        }

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.server_ip:
            self._use_address(self.config.server_ip)  # connect at once, in parallel with wake
        self.ensure_awake("start")
        self._monitor_task = loop.create_task(self._monitor())

    async def wait_connected(self, timeout: float) -> bool:
        return await self._wait_link(timeout)

    async def open(self, host: str, port: int) -> LinkStream:
        """Open a stream, waking the server first if it sleeps; 503 "waking up" if not in time."""
        if not self._usable():
            self.ensure_awake("request")
            if not await self._wait_link(self.config.tunnel.link_wait_timeout):
                raise StreamOpenError(OpenFailure.TUNNEL_DOWN, self.waiting_message())
        assert self.tunnel is not None
        return await self.tunnel.open(host, port)

    def open_now(self, host: str, port: int) -> LinkStream | None:
        """Open a stream at once if a link is up; ``None`` otherwise (:meth:`open` wakes the
        server and waits)."""
        if self.tunnel is None or not self._usable():
            return None
        return self.tunnel.open_now(host, port)

    def waiting_message(self) -> str:
        if self.phase == "failed":
            return f"could not wake the server: {self.last_error}"
        if self.phase == "asleep":
            return "the server is asleep; this request is waking it, retry in a few seconds"
        state = self.server_state or "unknown"
        return f"server is waking up (state {state}); retry in a few seconds"

    async def stop(self, grace: float = 0.0) -> None:
        """Stop waking and monitoring, close the link, then release the server (``on_exit``)."""
        self._stopping = True
        for task in (self._wake_task, self._monitor_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._wake_task, self._monitor_task) if t is not None),
            return_exceptions=True,
        )
        if self.tunnel is not None:
            await self.tunnel.stop(grace)
        mode = self.lifecycle.on_exit
        if mode == "none" or not self.client.kill_url:
            return
        try:
            result = await self.client.release(self.agent_id, mode)
        except ControlApiError as exc:
            log(logger, logging.WARNING, "lifecycle.release_failed", mode=mode, reason=str(exc))
            return
        log(logger, logging.INFO, "lifecycle.released", mode=mode, agent=self.agent_id,
            action=result.get("action"), reason=result.get("reason"))  # fmt: skip

    # --- waking ----------------------------------------------------------------------------------

    def ensure_awake(self, reason: str) -> None:
        """Start a wake unless one runs or the last one ended under a retry interval ago."""
        loop = asyncio.get_running_loop()
        if self._stopping or (self._wake_task is not None and not self._wake_task.done()):
            return
        if loop.time() < self._next_wake:
            return
        self._wake_task = loop.create_task(self._wake(reason))

    async def _wake(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.lifecycle.connection_timeout
        self.phase = "waking"
        log(logger, logging.INFO, "lifecycle.waking", reason=reason, agent=self.agent_id)
        try:
            result = await self._call_with_retries("wake")
            if result is not None:
                await self._until_connected(result, started, deadline)
        finally:
            self._next_wake = loop.time() + self.lifecycle.connection_retry_interval
            if self.phase == "waking":
                self.phase = "failed"

    async def _call_with_retries(self, operation: str) -> dict[str, Any] | None:
        delay = FIRST_RETRY
        attempts = max(1, self.lifecycle.connection_max_retries)
        for attempt in range(1, attempts + 1):
            try:
                return await (self.client.wake() if operation == "wake" else self.client.status())
            except ControlApiError as exc:
                self.last_error = str(exc)
                level = logging.WARNING if attempt == 1 or exc.permanent else logging.DEBUG
                log(logger, level, "lifecycle.control_api_failed", operation=operation,
                    attempt=attempt, reason=str(exc))  # fmt: skip
                if exc.permanent or attempt == attempts:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.lifecycle.connection_retry_interval)
        log(logger, logging.ERROR, "lifecycle.wake_failed", reason=self.last_error)
        self.phase = "failed"
        return None

    async def _until_connected(
        self, result: dict[str, Any], started: float, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        log(logger, logging.INFO, "lifecycle.wake_requested", state=result.get("state"),
            changed=result.get("changed"), public_ip=result.get("public_ip"))  # fmt: skip
        delay = FIRST_RETRY
        next_progress = started + PROGRESS_EVERY
        while True:
            self._apply(result)
            if await self._wait_link(delay):
                self.phase = "connected"
                self.last_error = ""
                self.wake_seconds = round(loop.time() - started, 3)
                log(logger, logging.INFO, "lifecycle.ready", server=self.address,
                    seconds=self.wake_seconds)  # fmt: skip
                return
            now = loop.time()
            if now >= deadline:
                self.last_error = (
                    f"no link {self.lifecycle.connection_timeout:g}s after wake "
                    f"(server {self.server_state}; last link error: "
                    f"{self.tunnel.last_error if self.tunnel else 'no address yet'})"
                )
                log(logger, logging.ERROR, "lifecycle.wake_timeout", reason=self.last_error)
                self.phase = "failed"
                return
            if now >= next_progress:
                log(logger, logging.INFO, "lifecycle.waiting", state=self.server_state,
                    seconds=round(now - started))  # fmt: skip
                next_progress = now + PROGRESS_EVERY
            try:
                result = await self.client.status()
                if result.get("desired") == 0:  # stopped meanwhile (a schedule, an operator)
                    result = await self.client.wake()
            except ControlApiError as exc:
                self.last_error = str(exc)
                log(logger, logging.DEBUG, "lifecycle.control_api_failed", operation="status",
                    reason=str(exc))  # fmt: skip
            delay = min(delay * 2, self.lifecycle.connection_retry_interval)

    def _apply(self, result: dict[str, Any]) -> None:
        """Take the server's state and address from a wake/status answer."""
        state = result.get("state")
        self.server_state = state if isinstance(state, str) else None
        address = result.get("public_ip")
        self.public_ip = address if isinstance(address, str) and address else None
        if self.config.server_ip is None and self.public_ip is not None:
            self._use_address(self.public_ip)

    def _use_address(self, host: str) -> None:
        """Connect to ``host`` (a new tunnel if the address changed)."""
        old = self.tunnel
        if old is not None and old.host == host:
            return
        if old is not None:
            log(logger, logging.INFO, "lifecycle.address_changed", old=old.host, new=host)
            task = asyncio.get_running_loop().create_task(old.stop())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        config = self.config
        connector = self._connector_for(host) if self._connector_for is not None else None
        self.tunnel = Tunnel(
            host, config.server_port, config.server_name, self.ssl_context, self.tunnel_config,
            connector=connector,
        )  # fmt: skip
        self.tunnel.start()
        self._tunnel_event.set()  # wake waiters holding the previous event
        self._tunnel_event = asyncio.Event()

    def _waking(self) -> bool:
        return self._wake_task is not None and not self._wake_task.done()

    def _usable(self) -> bool:
        return self.tunnel is not None and any(link.usable for link in self.tunnel.links)

    async def _wait_link(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a usable link, across tunnel replacements."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._usable():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self.phase == "failed" and not self._waking():
                return False  # the wake gave up: say so now rather than at the deadline
            tunnel, event, wake = self.tunnel, self._tunnel_event, self._wake_task
            waiters: list[asyncio.Future[Any]] = [loop.create_task(event.wait())]
            if tunnel is not None:
                waiters.append(loop.create_task(tunnel.wait_connected(remaining)))
            if wake is asyncio.current_task():
                wake = None  # the wake itself waiting for its link
            if wake is not None and not wake.done():
                waiters.append(asyncio.shield(wake))  # cancelling the wait leaves the wake be
            done, pending = await asyncio.wait(
                waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if not done:
                return self._usable()
            if wake is not None and wake.done():
                continue  # the wake ended: connected, or failed (checked at the loop's head)
            if tunnel is not None and tunnel is self.tunnel and not self._usable():
                # wait_connected saw a stale "available": let the tunnel wait for a link itself.
                await asyncio.sleep(min(FIRST_RETRY, max(0.0, deadline - loop.time())))
        return True

    # --- after the link is up ---------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Notice the server was put to sleep (or moved) once the link has dropped."""
        interval = self.lifecycle.connection_retry_interval
        while True:
            await asyncio.sleep(interval)
            if self.phase != "connected" or self._usable():
                continue
            try:
                result = await self.client.status()
            except ControlApiError as exc:
                log(logger, logging.DEBUG, "lifecycle.control_api_failed", operation="status",
                    reason=str(exc))  # fmt: skip
                continue
            if result.get("desired") == 0 or result.get("state") in ("stopped", "stopping"):
                self.phase = "asleep"
                self.server_state = str(result.get("state"))
                log(logger, logging.INFO, "lifecycle.server_asleep", state=self.server_state,
                    hint="the next request wakes it")  # fmt: skip
                if self.tunnel is not None and self.config.server_ip is None:
                    tunnel, self.tunnel = self.tunnel, None
                    await tunnel.stop()
            else:
                self._apply(result)
