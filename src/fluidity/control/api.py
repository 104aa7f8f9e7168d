"""The local control API and ``fluidity control serve``: the Lambda operations over plain HTTP.

``POST /wake``, ``POST /sleep``, ``POST /kill`` (a release with ``{"mode": "release",
"agent_id": ...}`` or ``?only_if_idle=true``), ``GET /status``; every request must carry the shared
key in ``x-api-key`` (403 otherwise, and nothing changes). The answers are the same JSON documents
the Lambda handlers return (see docs/lambda.md). Backend calls run in worker threads, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field

from fluidity.config import ControlConfig
from fluidity.control.core import Backend, Controller, Policy
from fluidity.control.operations import OPERATIONS, Request, error, handle
from fluidity.control.schedule import Schedule, parse_daily_time
from fluidity.errors import ConfigError
from fluidity.logs import log
from fluidity.minihttp import HttpRequest, HttpResponse, serve_http
from fluidity.runtime import shutdown_event

logger = logging.getLogger("fluidity.control")

RECONCILE_INTERVAL = 1.0
"""Seconds between checks of the local server process (restart if it died, SIGKILL if stuck)."""


class ControlApi:
    """The HTTP API around a :class:`Controller`."""

    def __init__(self, controller: Controller, api_key: str, host: str, port: int) -> None:
        if not api_key:
            raise ConfigError(
                "the control API needs a shared key: set api_key (e.g. api_key: "
                '"${FLUIDITY_CONTROL_KEY}") or FLUIDITY_API_KEY'
            )
        self.controller = controller
        self.api_key = api_key
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await serve_http(self._answer, self.host, self._port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self._port} for the control API: {exc.strerror} "
                "(is another control plane running? set listen_port)"
            ) from None
        log(logger, logging.INFO, "control.listening", url=self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        operation = request.path.strip("/")
        if operation not in OPERATIONS:
            response = error(404, "not_found", "use POST /wake, /sleep, /kill or GET /status")
        else:
            call = Request(request.method, request.query, request.headers, request.body)
            response = await asyncio.to_thread(
                handle, operation, call, self.controller, self.api_key
            )
        return HttpResponse(response.status, response.body())


def server_command(config: ControlConfig) -> list[str]:
    """The command line the local backend starts the server with."""
    local = config.local
    command = list(local.server_command) or [sys.executable, "-m", "fluidity", "server"]
    if local.server_config is not None:
        command += ["--config", str(local.server_config)]
    return command


def build_backend(config: ControlConfig) -> Backend:
    """The backend ``config.backend`` names (ECS needs boto3: ``pip install 'fluidity[aws]'``)."""
    if config.backend == "local":
        from fluidity.control.backends.local import LocalBackend

        return LocalBackend(
            server_command(config),
            admin_port=config.local.admin_port,
            public_host=config.local.public_host,
            stop_timeout=config.local.stop_timeout,
        )
    try:
        from fluidity.control.backends.ecs import EcsBackend
    except ImportError:
        raise ConfigError("the ecs backend needs boto3: pip install 'fluidity[aws]'") from None
    ecs = config.ecs
    return EcsBackend(
        ecs.cluster_name,
        ecs.service_name,
        namespace=config.metrics_namespace,
        lookback=config.metric_lookback,
        region=ecs.region,
        endpoint_url=ecs.endpoint_url,
    )


def policy_of(config: ControlConfig) -> Policy:
    return Policy(
        idle_threshold=config.idle_threshold,
        startup_grace=config.startup_grace,
        release_window=config.release_window,
    )


@dataclass
class ControlPlane:
    """API + schedule + backend, started and stopped together (the tests use it in-process)."""

    controller: Controller
    api: ControlApi
    schedule: Schedule
    _reconciler: asyncio.Task[None] | None = field(default=None, init=False)

    @classmethod
    def from_config(cls, config: ControlConfig, backend: Backend | None = None) -> ControlPlane:
        daily_kill = parse_daily_time(config.daily_kill_time)
        controller = Controller(backend or build_backend(config), policy_of(config))
        api = ControlApi(controller, config.api_key or "", config.listen_addr, config.listen_port)
        schedule = Schedule(
            controller, sleep_interval=config.sleep_check_interval, daily_kill=daily_kill
        )
        return cls(controller, api, schedule)

    async def start(self) -> None:
        await self.api.start()
        self.schedule.start()
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())

    async def _reconcile(self) -> None:
        reconcile = getattr(self.controller.backend, "reconcile", None)
        if reconcile is None:
            return
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            await asyncio.to_thread(reconcile)

    async def close(self) -> None:
        """Stop the API and schedule; a local server process is stopped too (never an ECS one)."""
        if self._reconciler is not None:
            self._reconciler.cancel()
        await self.schedule.stop()
        await self.api.close()
        close = getattr(self.controller.backend, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


async def serve_control(config: ControlConfig) -> None:
    """``fluidity control serve``: run until SIGINT/SIGTERM."""
    plane = ControlPlane.from_config(config)
    stop = shutdown_event()
    await plane.start()
    log(logger, logging.INFO, "control.ready", backend=config.backend,
        idle_threshold=f"{config.idle_threshold:g}s",
        sleep_check_interval=f"{config.sleep_check_interval:g}s",
        daily_kill=config.daily_kill_time or "off")  # fmt: skip
    try:
        await stop.wait()
    finally:
        log(logger, logging.INFO, "control.stopping")
        await plane.close()
