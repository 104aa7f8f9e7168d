"""The server's activity counters for the outside: CloudWatch, Prometheus, and a JSON status.

* :class:`ServerMetrics` samples the counters of :class:`~fluidity.server.stats.ServerStats` and,
  every ``ACTIVITY_SAMPLE`` seconds, each agent link's counters (streams opened, DATA bytes), so it
  knows when each connected agent (client certificate common name) last tunnelled something. The
  control plane's release decision needs that per agent; an agent answering keepalive PINGs is
  idle, and an agent whose link is closed is gone.
* :class:`CloudWatchEmitter` publishes every ``metrics_interval`` with ``PutMetricData`` in a
  worker thread, so a slow or failing AWS API never blocks the data path: namespace
  ``metrics_namespace`` (``Fluidity``), dimensions ``ClusterName`` and ``ServiceName``, metrics
  ``ActiveConnections``, ``ActiveStreams`` (gauges), ``StreamsOpened``, ``BytesIn``, ``BytesOut``
  (counts since the last successful publish, so a failed publish is folded into the next),
  ``LastActivityEpochSeconds`` (Unix time of the last activity, or of the server's start if there
  was none), and ``AgentLastActivityEpochSeconds`` per connected agent (one more dimension,
  ``AgentId``; published only while that agent's link is open).
  Failures are logged once per distinct reason and retried with backoff; at most one call is in
  flight.
* :class:`AdminEndpoint` answers ``GET /metrics`` (Prometheus text format) and ``GET /status``
  (JSON) on ``admin_addr:admin_port`` (loopback; 0 = off). The local control backend reads
  ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fluidity.config import ServerConfig
from fluidity.errors import ConfigError
from fluidity.logs import log
from fluidity.minihttp import HttpRequest, HttpResponse, serve_http
from fluidity.server.listener import Server
from fluidity.server.stats import ServerStats, StatsSnapshot

logger = logging.getLogger("fluidity.server.metrics")

ACTIVITY_SAMPLE = 1.0
"""Seconds between samples of the per-link counters: the precision of per-agent activity times."""
AGENT_RETENTION = 3600.0
"""Seconds an agent's last activity is remembered (and published) after its link closed."""
MAX_AGENTS = 256
"""Most agents remembered; the least recently active are forgotten first."""
RETRY_INITIAL = 1.0
"""First delay (seconds) before retrying a failed PutMetricData; doubles up to the interval."""


class _Session(Protocol):
    @property
    def streams_opened(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...


class _Link(Protocol):
    @property
    def identity(self) -> str: ...
    @property
    def session(self) -> _Session: ...


class ServerMetrics:
    """Counters, per-agent activity and start time of one server process."""

    def __init__(
        self,
        stats: ServerStats,
        links: Callable[[], Iterable[_Link]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self._links = links
        self._clock = clock
        self.started_at = clock()
        self._link_counters: dict[int, tuple[int, int, int]] = {}
        self._agents: dict[str, float] = {}
        self._connected: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Note which links moved streams or bytes since the last sample (cheap: O(links))."""
        now = self._clock()
        seen: dict[int, tuple[int, int, int]] = {}
        connected: set[str] = set()
        for link in self._links():
            s = link.session
            counters = (s.streams_opened, s.bytes_received, s.bytes_sent)
            key = id(link)
            seen[key] = counters
            connected.add(link.identity)
            if counters != self._link_counters.get(key, (0, 0, 0)):
                self._agents[link.identity] = now
        self._link_counters = seen
        self._connected = connected
        cutoff = now - AGENT_RETENTION
        if len(self._agents) > MAX_AGENTS or any(t < cutoff for t in self._agents.values()):
            recent = sorted(self._agents.items(), key=lambda item: item[1], reverse=True)
            self._agents = {a: t for a, t in recent[:MAX_AGENTS] if t >= cutoff}

    def agents(self) -> dict[str, float]:
        """Connected agent id -> Unix time of its last tunnelled activity.

        Only agents with a link open at the last sample, and only those that ever tunnelled
        something (within ``AGENT_RETENTION``): an agent that left, or that only sends keepalive
        PINGs, keeps nobody's server up.
        """
        return {a: t for a, t in self._agents.items() if a in self._connected}

    def snapshot(self) -> StatsSnapshot:
        self.sample()
        return self.stats.snapshot()

    def last_activity(self, snap: StatsSnapshot) -> float:
        """The last activity, or the start time if nothing happened yet."""
        return snap.last_activity if snap.last_activity > 0 else self.started_at

    def status(self) -> dict[str, Any]:
        """The JSON ``/status`` document (times in Unix seconds)."""
        snap = self.snapshot()
        return {
            "started_at": round(self.started_at, 3),
            "last_activity": round(snap.last_activity, 3) if snap.last_activity > 0 else None,
            "active_connections": snap.active_connections,
            "active_streams": snap.active_streams,
            "streams_opened": snap.streams_opened,
            "bytes_in": snap.bytes_in,
            "bytes_out": snap.bytes_out,
            "agents": {agent: round(t, 3) for agent, t in sorted(self.agents().items())},
        }

    def prometheus(self) -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4)."""
        snap = self.snapshot()
        rows = [
            ("fluidity_active_connections", "gauge", "Agent links open.",
             snap.active_connections),
            ("fluidity_active_streams", "gauge", "Streams open.", snap.active_streams),
            ("fluidity_streams_opened_total", "counter", "Streams opened since start.",
             snap.streams_opened),
            ("fluidity_bytes_in_total", "counter", "Bytes received from agents (towards targets).",
             snap.bytes_in),
            ("fluidity_bytes_out_total", "counter", "Bytes sent to agents (from targets).",
             snap.bytes_out),
            ("fluidity_last_activity_timestamp_seconds", "gauge",
             "Unix time of the last stream opened or byte carried (start time if none).",
             self.last_activity(snap)),
            ("fluidity_start_time_seconds", "gauge", "Unix time the server started.",
             self.started_at),
        ]  # fmt: skip
        lines: list[str] = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        name = "fluidity_agent_last_activity_timestamp_seconds"
        lines += [f"# HELP {name} Unix time of each agent's last activity.", f"# TYPE {name} gauge"]
        for agent, seen in sorted(self.agents().items()):
            label = agent.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}{{agent="{label}"}} {seen}')
        return "\n".join(lines) + "\n"

    def start_sampling(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(ACTIVITY_SAMPLE)
                self.sample()

        self._task = asyncio.get_running_loop().create_task(loop())

    def stop_sampling(self) -> None:
        if self._task is not None:
            self._task.cancel()


def cloudwatch_client() -> Any:
    """A CloudWatch client with short timeouts (region and credentials from the environment)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(
            "emit_metrics: true needs boto3: pip install 'fluidity[aws]' (or set emit_metrics: "
            "false)"
        ) from None
    config = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2})
    return boto3.client("cloudwatch", config=config)


class CloudWatchEmitter:
    """Publishes :class:`ServerMetrics` to CloudWatch every ``interval`` seconds; never raises."""

    def __init__(
        self,
        metrics: ServerMetrics,
        *,
        namespace: str,
        cluster: str,
        service: str,
        interval: float,
        client_factory: Callable[[], Any] = cloudwatch_client,
    ) -> None:
        self.metrics = metrics
        self.namespace = namespace
        self.dimensions = [
            {"Name": "ClusterName", "Value": cluster},
            {"Name": "ServiceName", "Value": service},
        ]
        self.interval = max(1.0, interval)
        self._client_factory = client_factory
        self._client: Any = None
        self._published = (0, 0, 0)  # streams, bytes in, bytes out at the last success
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None
        self.publishes = 0  # successful PutMetricData calls, for tests and /status
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            # Publish at once (a fresh server's start time reaches the sleep decision early),
            # then every interval; retries never push the schedule back.
            next_tick += self.interval
            delay = RETRY_INITIAL
            while True:
                if await self.publish_once():
                    break
                if loop.time() + delay >= next_tick:
                    break  # the next tick carries the counts this one failed to publish
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.interval)
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    def datums(self, now: float) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
        """The MetricData of one publish, and the totals it reports up to."""
        snap = self.metrics.snapshot()
        totals = (snap.streams_opened, snap.bytes_in, snap.bytes_out)
        opened, bytes_in, bytes_out = (
            max(0, a - b) for a, b in zip(totals, self._published, strict=True)
        )
        rows = [
            ("ActiveConnections", snap.active_connections, "Count"),
            ("ActiveStreams", snap.active_streams, "Count"),
            ("StreamsOpened", opened, "Count"),
            ("BytesIn", bytes_in, "Bytes"),
            ("BytesOut", bytes_out, "Bytes"),
            ("LastActivityEpochSeconds", self.metrics.last_activity(snap), "Seconds"),
        ]
        data = [self._datum(name, value, unit, self.dimensions, now) for name, value, unit in rows]
        for agent, seen in sorted(self.metrics.agents().items()):
            dims = [*self.dimensions, {"Name": "AgentId", "Value": agent[:255] or "unknown"}]
            data.append(self._datum("AgentLastActivityEpochSeconds", seen, "Seconds", dims, now))
        return data, totals

    @staticmethod
    def _datum(
        name: str, value: float, unit: str, dims: list[dict[str, str]], now: float
    ) -> dict[str, Any]:
        from datetime import UTC, datetime

        return {
            "MetricName": name,
            "Dimensions": dims,
            "Timestamp": datetime.fromtimestamp(now, tz=UTC),
            "Value": float(value),
            "Unit": unit,
        }

    async def publish_once(self) -> bool:
        """One PutMetricData in a worker thread; log and return False on any failure."""
        data, totals = self.datums(time.time())
        try:
            await asyncio.to_thread(self._put, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # boto3/botocore raise many types; none may reach the server
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"[:300]
            level = logging.WARNING if reason != self._last_error else logging.DEBUG
            log(logger, level, "metrics.publish_failed", namespace=self.namespace, reason=reason)
            self._last_error = reason
            return False
        if self._last_error:
            log(logger, logging.INFO, "metrics.publish_recovered", namespace=self.namespace)
            self._last_error = ""
        self._published = totals
        self.publishes += 1
        log(logger, logging.DEBUG, "metrics.published", namespace=self.namespace, datums=len(data))
        return True

    def _put(self, data: list[dict[str, Any]]) -> None:
        if self._client is None:
            self._client = self._client_factory()
        for start in range(0, len(data), 500):  # PutMetricData takes up to 1000 datums
            self._client.put_metric_data(
                Namespace=self.namespace, MetricData=data[start : start + 500]
            )


class AdminEndpoint:
    """``GET /metrics`` and ``GET /status`` on ``addr:port`` (0 picks a free port)."""

    def __init__(self, metrics: ServerMetrics, addr: str, port: int) -> None:
        self.metrics = metrics
        self.addr = addr
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await serve_http(self._answer, self.addr, self._port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.addr}:{self._port} for the admin endpoint: "
                f"{exc.strerror} (set admin_port)"
            ) from None
        log(logger, logging.INFO, "admin.listening", addr=f"{self.addr}:{self.port}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b'{"error":"method_not_allowed","reason":"use GET"}')
        if request.path == "/metrics":
            text = self.metrics.prometheus().encode()
            return HttpResponse(200, text, "text/plain; version=0.0.4; charset=utf-8")
        if request.path == "/status":
            return HttpResponse(200, json.dumps(self.metrics.status()).encode())
        return HttpResponse(404, b'{"error":"not_found","reason":"use /metrics or /status"}')


class Telemetry:
    """What :func:`start_telemetry` started for one server; ``close()`` stops it all."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.emitter: CloudWatchEmitter | None = None
        self.admin: AdminEndpoint | None = None

    async def close(self) -> None:
        if self.emitter is not None:
            await self.emitter.stop()
        if self.admin is not None:
            await self.admin.close()
        self.metrics.stop_sampling()


async def start_telemetry(server: Server, config: ServerConfig) -> Telemetry:
    """Start per-agent sampling, and the CloudWatch emitter and admin endpoint if configured."""
    telemetry = Telemetry(ServerMetrics(server.stats, lambda: server.links))
    if not config.emit_metrics and not config.admin_port:
        return telemetry
    telemetry.metrics.start_sampling()
    if config.emit_metrics:
        cloudwatch_client_check()
        telemetry.emitter = CloudWatchEmitter(
            telemetry.metrics,
            namespace=config.metrics_namespace,
            cluster=config.cluster_name,
            service=config.service_name,
            interval=config.metrics_interval,
        )
        telemetry.emitter.start()
        log(logger, logging.INFO, "metrics.emitting", namespace=config.metrics_namespace,
            cluster=config.cluster_name, service=config.service_name,
            interval=f"{config.metrics_interval:g}s")  # fmt: skip
    if config.admin_port:
        telemetry.admin = AdminEndpoint(telemetry.metrics, config.admin_addr, config.admin_port)
        await telemetry.admin.start()
    return telemetry


def cloudwatch_client_check() -> None:
    """Fail at start, with the fix, if boto3 is missing."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ConfigError(
            "emit_metrics: true needs boto3: pip install 'fluidity[aws]' (or set emit_metrics: "
            "false)"
        ) from None
