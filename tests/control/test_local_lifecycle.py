"""The whole lifecycle on one machine: control API + local backend (a real `fluidity server`
process) + agents with ``lifecycle.enabled``. The server starts on demand, sleeps when idle, stays
up while another agent uses it, and nothing moves for a wrong key."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fluidity.agent.app import Agent
from fluidity.certs import PkiPaths, issue_client
from fluidity.config import AgentConfig, ControlConfig, LifecycleConfig, LocalBackendConfig
from fluidity.control.api import ControlPlane
from fluidity.control.backends.local import LocalBackend
from tests.integration.origins import HttpOrigin
from tests.integration.stack import tunnel_config

KEY = "local-control-key"
WAIT = 30.0  # bound of every wait for a state (seconds); generous for a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_server_config(directory: Path, pki: PkiPaths, port: int) -> Path:
    path = directory / "server.yaml"
    path.write_text(
        "listen_addr: 127.0.0.1\n"
        f"listen_port: {port}\n"
        f"cert_file: {pki.server_cert}\nkey_file: {pki.server_key}\nca_cert_file: {pki.ca_cert}\n"
        'shutdown_grace: "1s"\n'
        "egress:\n  allow_cidrs: ['127.0.0.0/8']\n"
    )
    return path


@asynccontextmanager
async def control_plane(pki: PkiPaths, directory: Path, **policy: Any) -> AsyncIterator[Plane]:
    server_port = free_port()
    config = ControlConfig(
        api_key=KEY,
        listen_port=0,
        daily_kill_time="",
        local=LocalBackendConfig(
            server_config=write_server_config(directory, pki, server_port), stop_timeout=10
        ),
        **policy,
    )
    plane = ControlPlane.from_config(config)
    await plane.start()
    try:
        yield Plane(plane, server_port)
    finally:
        await plane.close()


class Plane:
    def __init__(self, plane: ControlPlane, server_port: int) -> None:
        self.plane = plane
        self.server_port = server_port
        self.url = plane.api.url
        backend = plane.controller.backend
        assert isinstance(backend, LocalBackend)
        self.backend = backend

    def status(self) -> dict[str, Any]:
        return self.plane.controller.status()

    async def wait_state(self, state: str) -> dict[str, Any]:
        return await wait_for(lambda: self.status()["state"] == state, self.status)


async def wait_for(done: Callable[[], bool], value: Callable[[], Any]) -> Any:
    """Poll ``done`` (bounded by WAIT) on a worker thread; return ``value()``."""
    deadline = time.monotonic() + WAIT
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline, f"timed out; last value {value()}"
        await asyncio.sleep(0.1)
    return value()


def agent_config(
    plane: Plane, cert: Path, key: Path, ca: Path, *, api_key: str = KEY, **lifecycle: Any
) -> AgentConfig:
    return AgentConfig(
        server_ip=None,  # learnt from the control plane's status, as for a Fargate task
        server_port=plane.server_port,
        local_proxy_port=0,
        cert_file=cert,
        key_file=key,
        ca_cert_file=ca,
        tunnel=tunnel_config(link_wait_timeout=15.0),
        lifecycle=LifecycleConfig(
            enabled=True,
            wake_api_endpoint=f"{plane.url}/wake",
            kill_api_endpoint=f"{plane.url}/kill",
            **{
                "api_key": api_key,
                "connection_retry_interval": 0.5,
                "connection_timeout": WAIT,
                **lifecycle,
            },
        ),
    )


@asynccontextmanager
async def running(config: AgentConfig) -> AsyncIterator[Agent]:
    agent = Agent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(grace=0)


async def proxy_get(proxy_port: int, url: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def control_call(plane: Plane, method: str, path: str, key: str | None) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", plane.plane.api.port)
    auth = f"x-api-key: {key}\r\n" if key is not None else ""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_first_request_wakes_the_server_idle_puts_it_to_sleep_next_request_wakes_it(
    pki: PkiPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    policy = {"idle_threshold": 1.0, "startup_grace": 2.0, "sleep_check_interval": 0.25}
    async with HttpOrigin() as origin, control_plane(pki, tmp_path, **policy) as plane:
        assert plane.status()["state"] == "stopped"
        config = agent_config(plane, pki.client_cert, pki.client_key, pki.ca_cert)
        started = time.perf_counter()
        async with running(config) as agent:
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/1000"))
            first_byte = time.perf_counter() - started
            assert status == 200
            assert len(body) == 1000
            print(f"\nwake-to-first-byte (agent start to first response): {first_byte:.3f}s")
            assert plane.backend.starts == 1

            # No traffic: after the grace and the idle threshold the server is put to sleep,
            # and the agent notices and closes its tunnel.
            stopped = await plane.wait_state("stopped")
            assert stopped["desired"] == 0
            assert agent.lifecycle is not None
            lifecycle = agent.lifecycle
            await wait_for(lambda: lifecycle.phase == "asleep", lifecycle.status)

            # On demand: the next request wakes it again and succeeds.
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/10"))
            assert (status, len(body)) == (200, 10)
            assert plane.backend.starts == 2
        # The agent's exit released the server (or the idle check got there first).
        assert plane.status()["desired"] == 0
    sleeps = [r.getMessage() for r in caplog.records if "control.sleep" in r.getMessage()]
    assert any("action=scaled_down" in line and "last_activity=" in line for line in sleeps)


async def test_one_agent_leaving_does_not_stop_a_server_another_agent_uses(
    pki: PkiPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity.agent.lifecycle")
    certs = tmp_path / "certs"
    shutil.copytree(pki.directory, certs)
    issue_client(certs, "laptop-2")
    policy = {"idle_threshold": 60.0, "startup_grace": 0.0, "release_window": 30.0}
    async with HttpOrigin() as origin, control_plane(pki, tmp_path, **policy) as plane:
        first = agent_config(plane, pki.client_cert, pki.client_key, pki.ca_cert)
        second = agent_config(plane, certs / "laptop-2.crt", certs / "laptop-2.key", pki.ca_cert)
        async with running(second) as other:
            async with running(first) as leaving:
                for agent in (leaving, other):
                    status, _ = await proxy_get(agent.proxy_port, origin.url("/bytes/100"))
                    assert status == 200
            # `leaving` has exited and released: `other` was active, so the server runs on.
            released = [
                r.getMessage() for r in caplog.records if "lifecycle.released" in r.getMessage()
            ]
            assert released and "agent=fluidity-client action=no_change" in released[-1]
            assert plane.status()["state"] == "running"
            status, _ = await proxy_get(other.proxy_port, origin.url("/bytes/100"))
            assert status == 200
        # The last agent leaves: nobody else is active, the server stops.
        released = [
            r.getMessage() for r in caplog.records if "lifecycle.released" in r.getMessage()
        ]
        assert "agent=laptop-2 action=scaled_down" in released[-1]
        await plane.wait_state("stopped")
        assert plane.backend.starts == 1


async def test_wrong_api_key_gets_403_and_changes_nothing(pki: PkiPaths, tmp_path: Path) -> None:
    async with HttpOrigin() as origin, control_plane(pki, tmp_path) as plane:
        for method, path in (
            ("POST", "/wake"),
            ("POST", "/sleep"),
            ("POST", "/kill"),
            ("GET", "/status"),
        ):
            for key in ("wrong", None, KEY + "x"):
                status, body = await control_call(plane, method, path, key)
                assert (status, body["error"]) == (403, "forbidden")
        status, body = await control_call(plane, "GET", "/status", KEY)
        assert (status, body["state"], body["changed"]) == (200, "stopped", False)
        assert (await control_call(plane, "GET", "/wake", KEY))[0] == 405
        assert (await control_call(plane, "POST", "/reboot", KEY))[0] == 404

        # An agent with the wrong key: its clients get a 503 that says what to fix, at once.
        config = agent_config(plane, pki.client_cert, pki.client_key, pki.ca_cert, api_key="bad")
        async with running(config) as agent:
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/10"))
            assert status == 503
            assert b"refused the key" in body
            assert b"lifecycle.api_key" in body
        assert plane.status()["state"] == "stopped"
        assert plane.backend.starts == 0


def test_the_control_api_refuses_to_run_without_a_key() -> None:
    from fluidity.errors import ConfigError

    config = ControlConfig(api_key=None, listen_port=0, daily_kill_time="")
    with pytest.raises(ConfigError, match="needs a shared key"):
        ControlPlane.from_config(config, backend=LocalBackend(["true"]))


async def test_requests_while_the_server_wakes_get_503_not_a_hang(
    pki: PkiPaths, tmp_path: Path
) -> None:
    # A server that never comes up: its config points at certificates that do not exist.
    async with HttpOrigin() as origin, control_plane(pki, tmp_path) as plane:
        config_file = plane.backend.command[-1]
        Path(config_file).write_text(
            Path(config_file).read_text().replace(str(pki.server_cert), "/nonexistent.crt")
        )
        config = agent_config(
            plane, pki.client_cert, pki.client_key, pki.ca_cert, connection_timeout=3.0
        )
        config = config.model_copy(update={"tunnel": tunnel_config(link_wait_timeout=1.0)})
        async with running(config) as agent:
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/10"))
            assert status == 503
            assert b"server is waking up" in body
            lifecycle = agent.lifecycle
            assert lifecycle is not None
            assert lifecycle.status()["phase"] == "waking"
            # After connection_timeout the wake is reported as failed, with the link's error.
            await wait_for(lambda: lifecycle.phase == "failed", lifecycle.status)
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/10"))
            assert status == 503
            assert b"could not wake the server: no link 3s after wake" in body


async def test_a_wanted_server_that_dies_is_started_again(pki: PkiPaths, tmp_path: Path) -> None:
    async with control_plane(pki, tmp_path) as plane:
        await asyncio.to_thread(plane.plane.controller.wake)
        await plane.wait_state("running")
        process = plane.backend._process
        assert process is not None
        process.kill()  # a crash: the local "scheduler" starts it again, like ECS would
        await wait_for(lambda: plane.backend.starts == 2, plane.status)
        assert (await plane.wait_state("running"))["desired"] == 1


def test_a_server_that_ignores_sigterm_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    import sys

    ready = tmp_path / "ready"
    ignore_term = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    backend = LocalBackend([sys.executable, "-c", ignore_term, str(ready)], stop_timeout=0.3)
    backend.set_desired(1)
    process = backend._process
    assert process is not None
    assert backend.observe().pending == 1  # started, not answering an admin endpoint
    deadline = time.monotonic() + WAIT
    while not ready.exists():  # its SIGTERM handler is in place
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    backend.set_desired(0)  # SIGTERM, ignored
    while process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        backend.reconcile()  # past stop_timeout: SIGKILL
    assert process.returncode == -9
    assert backend.observe().stopping == 0


async def test_control_api_failures_are_retried_until_it_answers(
    pki: PkiPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity.agent.lifecycle")
    port = free_port()
    async with HttpOrigin() as origin:
        placeholder = Plane.__new__(Plane)  # the agent's URLs, before the control plane exists
        placeholder.url, placeholder.server_port = f"http://127.0.0.1:{port}", free_port()
        config = agent_config(placeholder, pki.client_cert, pki.client_key, pki.ca_cert)
        agent = Agent(config)
        await agent.start()
        plane: ControlPlane | None = None
        try:
            await wait_for(
                lambda: any("control_api_failed" in r.getMessage() for r in caplog.records),
                lambda: caplog.text,
            )
            assert "control API unreachable" in caplog.text
            directory = tmp_path / "plane"
            directory.mkdir()
            control = ControlConfig(
                api_key=KEY,
                listen_port=port,
                daily_kill_time="",
                local=LocalBackendConfig(
                    server_config=write_server_config(directory, pki, placeholder.server_port),
                    stop_timeout=10,
                ),
            )
            plane = ControlPlane.from_config(control)
            await plane.start()
            status, body = await proxy_get(agent.proxy_port, origin.url("/bytes/10"))
            assert (status, len(body)) == (200, 10)
        finally:
            await agent.stop(grace=0)
            if plane is not None:
                await plane.close()


async def test_control_api_answers_malformed_http_with_400_and_nothing_changes(
    pki: PkiPaths, tmp_path: Path
) -> None:
    async with control_plane(pki, tmp_path) as plane:
        garbage = b"NOT HTTP AT ALL\r\n\r\n"
        too_big = b"POST /wake HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n"
        for raw in (garbage, too_big):
            reader, writer = await asyncio.open_connection("127.0.0.1", plane.plane.api.port)
            writer.write(raw)
            response = await reader.read()
            writer.close()
            status = int(response.split()[1])
            assert status in (400, 413)
            assert b'"reason"' in response
        assert plane.status()["state"] == "stopped"
        assert plane.backend.starts == 0
