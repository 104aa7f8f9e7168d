"""``fluidity server`` as a process: load certificates, listen, run until a signal, drain."""

from __future__ import annotations

import logging

from fluidity.config import ServerConfig
from fluidity.logs import log
from fluidity.runtime import shutdown_event
from fluidity.server.certsource import server_ssl_context
from fluidity.server.health import HealthEndpoint
from fluidity.server.listener import Server
from fluidity.server.metrics import start_telemetry
from fluidity.server.reload import TlsReloader

logger = logging.getLogger("fluidity.server")


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT/SIGTERM, then drain for ``shutdown_grace`` and return."""
    context = server_ssl_context(config)  # files, env or Secrets Manager (cert_source)
    server = Server(config, context)
    reloader = TlsReloader(server, config, lambda: server_ssl_context(config))  # CRL, SIGHUP
    stop = shutdown_event()
    await server.start()
    reloader.start()
    telemetry = await start_telemetry(server, config)  # CloudWatch and admin endpoint, if set
    health = HealthEndpoint(server, config.health_port, stop.is_set)
    if config.health_port:
        await health.start()
    await stop.wait()
    log(logger, logging.INFO, "server.stopping", grace=f"{config.shutdown_grace:g}s")
    await reloader.stop()
    await server.shutdown()
    await telemetry.close()
    await health.close()
