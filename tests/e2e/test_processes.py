"""The real thing: `fluidity server` and `fluidity agent` as processes, driven by curl.

Covers what only whole processes show: uvloop, signals and exit codes, `fluidity up`, a server
killed with SIGKILL mid-download and restarted, and garbage thrown at both ports.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths

FLUIDITY = [sys.executable, "-m", "fluidity"]
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


class Processes:
    """Starts processes with their output in files; stops them all at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in (content := self.log(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return content

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    manager = Processes(tmp_path)
    yield manager
    manager.stop_all()


@pytest.fixture
def site(tmp_path: Path, procs: Processes) -> tuple[int, Path]:
    """A static file origin (python -m http.server) on 127.0.0.1 with a 64 MiB file."""
    root = tmp_path / "site"
    root.mkdir()
    block = hashlib.sha256(b"fluidity").digest() * (MiB // 32)
    with open(root / "big.bin", "wb") as handle:
        for _ in range(64):
            handle.write(block)
    (root / "hello.txt").write_text("hello through the tunnel\n")
    port = free_port()
    proc = procs.start(
        "origin",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(root)],
    )
    wait_listening(port, proc)
    return port, root


def write_configs(
    tmp_path: Path, pki: PkiPaths, server_port: int, proxy_port: int
) -> tuple[Path, Path]:
    server = tmp_path / "server.yaml"
    server.write_text(
        f'listen_addr: "127.0.0.1"\nlisten_port: {server_port}\n'
        f'cert_file: "{pki.server_cert}"\nkey_file: "{pki.server_key}"\n'
        f'ca_cert_file: "{pki.ca_cert}"\n'
        "shutdown_grace: 2s\negress:\n  allow_cidrs: [127.0.0.0/8]\n"
    )
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f'server_ip: "127.0.0.1"\nserver_port: {server_port}\nlocal_proxy_port: {proxy_port}\n'
        f'cert_file: "{pki.client_cert}"\nkey_file: "{pki.client_key}"\n'
        f'ca_cert_file: "{pki.ca_cert}"\n'
        "shutdown_grace: 2s\ntunnel: {reconnect_initial: 100ms, reconnect_max: 1s}\n"
    )
    return server, agent


def curl(
    proxy_port: int, url: str, *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            str(int(timeout)),
            "-x",
            f"http://127.0.0.1:{proxy_port}",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )


def curl_until_ok(
    proxy_port: int, url: str, timeout: float = 15
) -> subprocess.CompletedProcess[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        result = curl(proxy_port, url, "--fail")
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_server_and_agent_processes_carry_http_and_stop_cleanly_on_sigterm(
    tmp_path: Path, pki: PkiPaths, procs: Processes, site: tuple[int, Path]
) -> None:
    origin_port, root = site
    server_port, proxy_port = free_port(), free_port()
    server_cfg, agent_cfg = write_configs(tmp_path, pki, server_port, proxy_port)
    server = procs.start("server", [*FLUIDITY, "server", "--config", str(server_cfg)])
    wait_listening(server_port, server)
    agent = procs.start("agent", [*FLUIDITY, "agent", "--config", str(agent_cfg)])
    wait_listening(proxy_port, agent)

    hello = curl_until_ok(proxy_port, f"http://127.0.0.1:{origin_port}/hello.txt")
    assert hello.stdout == b"hello through the tunnel\n", hello.stderr
    big = curl(proxy_port, f"http://127.0.0.1:{origin_port}/big.bin")
    assert (
        hashlib.sha256(big.stdout).digest()
        == hashlib.sha256((root / "big.bin").read_bytes()).digest()
    )

    for proc in (agent, server):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "agent.stopped" in procs.log("agent")
    assert "server.stopped" in procs.log("server")


def test_server_killed_mid_download_ends_transfer_and_agent_reconnects(
    tmp_path: Path, pki: PkiPaths, procs: Processes, site: tuple[int, Path]
) -> None:
    origin_port, _ = site
    server_port, proxy_port = free_port(), free_port()
    server_cfg, agent_cfg = write_configs(tmp_path, pki, server_port, proxy_port)
    server = procs.start("server", [*FLUIDITY, "server", "--config", str(server_cfg)])
    wait_listening(server_port, server)
    agent = procs.start("agent", [*FLUIDITY, "agent", "--config", str(agent_cfg)])
    wait_listening(proxy_port, agent)
    assert curl_until_ok(proxy_port, f"http://127.0.0.1:{origin_port}/hello.txt").returncode == 0

    download = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "--limit-rate", "4M", "-o", str(tmp_path / "partial"),
         "-x", f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{origin_port}/big.bin"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)
    server.send_signal(signal.SIGKILL)
    server.wait(5)
    started = time.monotonic()
    returncode = download.wait(30)
    elapsed = time.monotonic() - started
    assert returncode != 0, "a download cut by a dead server must not report success"
    assert elapsed < 15, f"the client waited {elapsed:.1f}s for a dead tunnel"
    assert (tmp_path / "partial").stat().st_size < 64 * MiB

    server = procs.start("server2", [*FLUIDITY, "server", "--config", str(server_cfg)])
    wait_listening(server_port, server)
    again = curl_until_ok(proxy_port, f"http://127.0.0.1:{origin_port}/hello.txt")
    assert again.returncode == 0, again.stderr
    assert "link.up" in procs.log("agent").split("link.down", 1)[-1]


def test_garbage_on_both_ports_is_logged_and_service_continues(
    tmp_path: Path, pki: PkiPaths, procs: Processes, site: tuple[int, Path]
) -> None:
    origin_port, _ = site
    server_port, proxy_port = free_port(), free_port()
    server_cfg, agent_cfg = write_configs(tmp_path, pki, server_port, proxy_port)
    server = procs.start("server", [*FLUIDITY, "server", "--config", str(server_cfg)])
    wait_listening(server_port, server)
    agent = procs.start("agent", [*FLUIDITY, "agent", "--config", str(agent_cfg)])
    wait_listening(proxy_port, agent)

    for port in (server_port, proxy_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(os.urandom(2048) + b"\r\n\r\n")
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # A TLS client with a valid certificate that then sends garbage frames.
    import ssl

    from fluidity.tls import client_context

    context = client_context(pki.client_cert, pki.client_key, pki.ca_cert)
    with (
        socket.create_connection(("127.0.0.1", server_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="fluidity-server") as tls,
    ):
        tls.sendall(b"\xff" * 64)
        tls.settimeout(5)
        try:
            while tls.recv(4096):
                pass
        except (ConnectionResetError, ssl.SSLError, TimeoutError):
            pass

    result = curl_until_ok(proxy_port, f"http://127.0.0.1:{origin_port}/hello.txt")
    assert result.stdout == b"hello through the tunnel\n"
    server_log = procs.log("server")
    assert "link.handshake_failed" in server_log
    assert "link.protocol_error" in server_log
    assert server.poll() is None and agent.poll() is None


def test_fluidity_up_runs_both_and_stops_on_ctrl_c(
    tmp_path: Path, procs: Processes, site: tuple[int, Path]
) -> None:
    origin_port, _ = site
    server_port, proxy_port = free_port(), free_port()
    up = procs.start(
        "up",
        [*FLUIDITY, "up", "--certs", str(tmp_path / "certs"), "--server-config",
         str(tmp_path / "none-s.yaml"), "--agent-config", str(tmp_path / "none-a.yaml"),
         "--server-port", str(server_port), "--proxy-port", str(proxy_port)],
        cwd=tmp_path,
    )  # fmt: skip
    wait_listening(proxy_port, up, timeout=20)
    result = curl_until_ok(proxy_port, f"http://127.0.0.1:{origin_port}/hello.txt")
    assert result.stdout == b"hello through the tunnel\n", procs.log("up")
    assert f"curl -x http://127.0.0.1:{proxy_port}" in procs.wait_for_log("up", "Ctrl-C")
    up.send_signal(signal.SIGINT)
    assert up.wait(20) == 0, procs.log("up")
    assert (tmp_path / "certs" / "ca.crt").exists()
