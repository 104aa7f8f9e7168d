"""What the Docker image runs, without Docker: the built wheel in a fresh virtualenv.

The image installs the project's wheel and nothing of the source tree (deployments/docker/
server.Dockerfile); there is no Docker engine here, so this builds the same wheel, installs it
with its declared dependencies into a new virtualenv, and runs that installation's
`fluidity server`, its health check (the image's HEALTHCHECK command) and `fluidity agent`, then
fetches a page through them end to end.
"""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths
from tests.cloud.conftest import REPO

BODY = b"served through the installed wheel\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the built wheel and its dependencies; returns its bin directory."""
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(REPO), "--no-deps", "-w", str(work / "dist")],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = (work / "dist").glob("fluidity-*.whl")
    venv = work / "venv"
    # No pip inside the new environment (saves seconds): the test's pip installs into it.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return venv / "bin"


@pytest.fixture
def origin() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_installed_wheel_serves_a_request_end_to_end(
    installed: Path, pki: PkiPaths, origin: int, tmp_path: Path
) -> None:
    where = subprocess.run(
        [str(installed / "python"), "-c", "import fluidity; print(fluidity.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert "site-packages" in where.stdout  # the wheel, not the source tree

    server_port, health_port, proxy_port = free_port(), free_port(), free_port()
    server_config = tmp_path / "server.yaml"
    server_config.write_text(
        f'listen_addr: "127.0.0.1"\nlisten_port: {server_port}\nhealth_port: {health_port}\n'
        f'cert_file: "{pki.server_cert}"\nkey_file: "{pki.server_key}"\n'
        f'ca_cert_file: "{pki.ca_cert}"\nshutdown_grace: 2s\n'
        "egress:\n  allow_cidrs: [127.0.0.0/8]\n"
    )
    agent_config = tmp_path / "agent.yaml"
    agent_config.write_text(
        f"server_port: {server_port}\nlocal_proxy_port: {proxy_port}\n"
        f'cert_file: "{pki.client_cert}"\nkey_file: "{pki.client_key}"\n'
        f'ca_cert_file: "{pki.ca_cert}"\nshutdown_grace: 1s\n'
        "tunnel: {reconnect_initial: 100ms, reconnect_max: 1s}\n"
    )
    fluidity = str(installed / "fluidity")
    healthcheck = [fluidity, "server", "healthcheck", "--config", str(server_config)]
    logs = tmp_path / "server.log"
    with open(logs, "wb") as log:
        server = subprocess.Popen(
            [fluidity, "server", "--config", str(server_config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    agent = subprocess.Popen(
        [fluidity, "agent", "--config", str(agent_config), "--server-ip", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_until(
            lambda: (
                subprocess.run(healthcheck, capture_output=True, check=False).returncode == 0
                or server.poll() is not None
            ),
            30,
            "the server's health check",
        )
        assert server.poll() is None, logs.read_text()

        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{proxy_port}"})
        )
        body = b""

        def fetched() -> bool:
            nonlocal body
            try:
                with opener.open(f"http://127.0.0.1:{origin}/hello", timeout=10) as response:
                    body = response.read()
                    return bool(response.status == 200)
            except OSError:
                return False  # agent not listening yet, or its link not up yet (503)

        wait_until(fetched, 30, "a response through agent and server")
        assert body == BODY

        server.send_signal(signal.SIGTERM)  # what ECS sends (the image's STOPSIGNAL)
        assert server.wait(30) == 0
        after = subprocess.run(healthcheck, capture_output=True, text=True, check=False)
        assert after.returncode == 1
        assert "cannot reach" in after.stderr
        assert "server.stopped" in logs.read_text()
    finally:
        for proc in (agent, server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
