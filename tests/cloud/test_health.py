"""The container health check: healthy only while the mTLS listener accepts and the loop answers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

from fluidity.certs import PkiPaths
from fluidity.server.health import HealthEndpoint, check_health
from fluidity.server.listener import Server
from fluidity.tls import server_context
from tests.integration.stack import server_config


async def start_server(pki: PkiPaths) -> Server:
    config = server_config()
    server = Server(config, server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    await server.start()
    return server


async def check(port: int, timeout: float = 5.0) -> tuple[bool, str]:
    # check_health blocks (it is what a separate healthcheck process runs): keep the loop free.
    result = await asyncio.to_thread(check_health, port, timeout)
    return result.healthy, result.detail


async def test_healthy_while_the_listener_accepts(pki: PkiPaths) -> None:
    server = await start_server(pki)
    draining = False
    health = HealthEndpoint(server, 0, lambda: draining)
    await health.start()
    try:
        healthy, detail = await check(health.port)
        assert healthy, detail
        assert detail == f"ok: listen_port={server.port} links=0 streams=0"
        draining = True  # SIGTERM received: the task must leave the load balancer
        healthy, detail = await check(health.port)
        assert not healthy
        assert detail.startswith("draining")
    finally:
        await server.shutdown(0)
        await health.close()


async def test_unhealthy_once_the_listener_is_closed(pki: PkiPaths) -> None:
    server = await start_server(pki)
    health = HealthEndpoint(server, 0, lambda: False)
    await health.start()
    try:
        await server.shutdown(0)  # listener closed, accept loop cancelled: agents cannot connect
        healthy, detail = await check(health.port)
        assert not healthy
        assert detail.startswith("not_accepting")
    finally:
        await health.close()


def test_unhealthy_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = check_health(port, 2.0)
    assert not result.healthy
    assert "cannot reach" in result.detail


def test_unhealthy_when_the_server_does_not_answer() -> None:
    # A wedged event loop accepts TCP (the kernel does) but never writes an answer.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
        thread.start()
        result = check_health(port, 0.5)
        thread.join(5)
        for conn in accepted:
            conn.close()
    assert not result.healthy
    assert "no answer" in result.detail


def test_healthcheck_command_fails_clearly_when_the_endpoint_is_off() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fluidity", "server", "healthcheck"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "health endpoint is off: set health_port" in proc.stderr
