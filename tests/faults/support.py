"""Helpers shared by the fault, hostile-input, load and browser tests.

- :class:`Proc`: a ``fluidity`` (or any) process with its output in a file, started on demand,
  stopped at the end; :func:`write_server_config` / :func:`write_agent_config` write YAML for it.
- :func:`fetch`: an HTTP/1.1 GET through the agent's proxy that never raises, hashes the body as
  it streams, and reports whether the transfer *claimed* success (so tests can insist that every
  transfer that claims success carries exactly the right bytes).
- :func:`wait_port`, :func:`free_port`, :func:`rss_kib`, :func:`open_fds`.

Everything listens and dials on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluidity.certs import PkiPaths

FLUIDITY = [sys.executable, "-m", "fluidity"]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int, proc: Proc | None = None, timeout: float = 20.0) -> None:
    """Wait until something accepts on ``port`` (or fail if ``proc`` exits first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listening on {port} after {timeout}s")


class Proc:
    """One child process whose stdout and stderr go to ``<directory>/<name>.log``."""

    def __init__(
        self,
        directory: Path,
        name: str,
        args: list[str],
        *,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.args = args
        self.nofile = nofile
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = 0  # the port it listens on, when the test wants to remember it

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        args = list(self.args)
        if self.nofile is not None:
            # prlimit, not a preexec_fn: fork-safe, and exactly what `ulimit -n` does.
            args = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.path, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        return self

    def log(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.popen is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.popen.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"{self.name} did not exit within {timeout}s")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    async def wait_log(self, text: str, timeout: float = 15.0, after: int = 0) -> str:
        """Wait until ``text`` appears in the log after character ``after``; return the log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in (content := self.log())[after:]:
            if loop.time() > deadline:
                raise AssertionError(f"{text!r} not in {self.name}'s log:\n{content[-4000:]}")
            await asyncio.sleep(0.05)
        return content

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)  # a SIGSTOPped process cannot die
            self.popen.kill()
        self.popen.wait(10)


def write_server_config(path: Path, pki: PkiPaths, port: int, **extra: Any) -> Path:
    lines = [
        'listen_addr: "127.0.0.1"',
        f"listen_port: {port}",
        f'cert_file: "{pki.server_cert}"',
        f'key_file: "{pki.server_key}"',
        f'ca_cert_file: "{pki.ca_cert}"',
        "shutdown_grace: 1s",
        "egress:",
        "  allow_cidrs: [127.0.0.0/8]",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_agent_config(
    path: Path,
    pki: PkiPaths,
    server_port: int,
    proxy_port: int,
    tunnel: str = "{reconnect_initial: 100ms, reconnect_max: 1s}",
    **extra: Any,
) -> Path:
    lines = [
        'server_ip: "127.0.0.1"',
        f"server_port: {server_port}",
        f"local_proxy_port: {proxy_port}",
        f'cert_file: "{pki.client_cert}"',
        f'key_file: "{pki.client_key}"',
        f'ca_cert_file: "{pki.ca_cert}"',
        "shutdown_grace: 1s",
        f"tunnel: {tunnel}",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Transfer:
    """The outcome of one :func:`fetch`."""

    status: int = 0
    expected: int | None = None  # Content-Length, if the response had one
    received: int = 0
    sha256: str = ""
    error: str = ""  # why the transfer did not complete; empty when it claims success

    @property
    def ok(self) -> bool:
        """True when the client would believe it got the whole body."""
        return not self.error and self.status == 200 and self.expected == self.received


async def fetch(
    proxy_port: int,
    url: str,
    *,
    progress: asyncio.Event | None = None,
    progress_bytes: int = 1 << 20,
    timeout: float = 60.0,
    headers: str = "",
) -> Transfer:
    """GET ``url`` through the proxy on a new connection; never raises.

    ``progress`` is set once ``progress_bytes`` of body have arrived (a download is under way).
    """
    result = Transfer()
    digest = hashlib.sha256()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, proxy_port)
            host = url.split("/", 3)[2]
            writer.write(
                f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            result.status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    result.expected = int(value.strip())
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                digest.update(data)
                result.received += len(data)
                if progress is not None and result.received >= progress_bytes:
                    progress.set()
                if result.expected is not None and result.received >= result.expected:
                    break
            if result.expected is not None and result.received < result.expected:
                result.error = f"short body: {result.received} of {result.expected} bytes"
    except TimeoutError:
        result.error = f"hung for {timeout}s"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    result.sha256 = digest.hexdigest()
    return result


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (from /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]
