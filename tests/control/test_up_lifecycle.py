"""``fluidity up --lifecycle`` as a process: control plane + agent; the server starts on demand and
is stopped when the agent exits."""

from __future__ import annotations

import http.server
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WAIT = 60.0  # seconds; bounds every wait below (certificates are made first, on a loaded machine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def origin() -> Iterator[int]:
    """A plain HTTP server on 127.0.0.1 answering every GET with 200 "hello"."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    thread.join()


def read_until(process: subprocess.Popen[bytes], marker: bytes, seen: bytearray) -> None:
    """Collect the process's output into ``seen`` until ``marker`` appears (bounded by WAIT)."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + WAIT
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in:\n{seen.decode(errors='replace')}"
        assert process.poll() is None, seen.decode(errors="replace")
        if selector.select(timeout=0.5):
            seen += os.read(process.stdout.fileno(), 65536)


def proxy_get(proxy_port: int, url: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=WAIT) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_up_with_lifecycle_starts_the_server_on_demand_and_stops_it_on_exit(
    tmp_path: Path, origin: int
) -> None:
    ports = {name: free_port() for name in ("control", "proxy", "server")}
    command = [
        sys.executable, "-m", "fluidity", "up", "--lifecycle",
        "--certs", str(tmp_path / "certs"),
        "--server-config", str(tmp_path / "server.local.yaml"),
        "--agent-config", str(tmp_path / "agent.local.yaml"),
        "--control-config", str(tmp_path / "control.local.yaml"),
        "--control-port", str(ports["control"]),
        "--proxy-port", str(ports["proxy"]),
        "--server-port", str(ports["server"]),
        "--ready-timeout", str(WAIT),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_")}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    seen = bytearray()
    try:
        read_until(process, b"Fluidity is up with its lifecycle", seen)
        status, body = proxy_get(ports["proxy"], f"http://127.0.0.1:{origin}/")
        assert (status, body) == (200, b"hello")
        read_until(process, b"local.server_started", seen)
        process.send_signal(signal.SIGINT)
        process.wait(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        seen += process.stdout.read()
    output = seen.decode(errors="replace")
    assert process.returncode == 0, output
    assert "lifecycle.released mode=release agent=fluidity-client action=scaled_down" in output
    assert "server.stopped" in output
    assert (tmp_path / ".fluidity" / "control.local.yaml").exists()
