"""``fluidity server`` as a process: load certificates, listen, run until a signal, drain."""

from __future__ import annotations

import logging

from fluidity.config import ServerConfig
from fluidity.logs import log
from fluidity.runtime import shutdown_event
from fluidity.server.listener import Server
from fluidity.tls import server_context

logger = logging.getLogger("fluidity.server")


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT/SIGTERM, then drain for ``shutdown_grace`` and return."""
    context = server_context(config.cert_file, config.key_file, config.ca_cert_file)
    server = Server(config, context)
    stop = shutdown_event()
    await server.start()
    await stop.wait()
    log(logger, logging.INFO, "server.stopping", grace=f"{config.shutdown_grace:g}s")
    await server.shutdown()
