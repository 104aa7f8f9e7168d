"""Processes of a benchmark run: started and recorded by PID, measured from /proc, stopped by PID.

Nothing here kills by name or by process group: every process the harness starts is recorded
with its PID, and so is every descendant it is seen to have (sshd forks one per connection), and
each is stopped by that PID (SIGTERM, then SIGKILL after a bounded wait).

CPU time comes from ``/proc/PID/stat`` (``utime + stime + cutime + cstime``, in clock ticks:
10 ms on Linux), summed over a chain's processes and their live descendants; peak memory from
``VmHWM`` in ``/proc/PID/status``. Linux only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A step of the benchmark could not be done; the message says which and why."""


@dataclass
class Started:
    """One process the harness started."""

    name: str
    pid: int
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class ProcessTable:
    """Every process started in a run, with the descendants seen; stops them all by PID."""

    directory: Path
    started: list[Started] = field(default_factory=list)
    seen_children: set[int] = field(default_factory=set)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Started:
        """Start ``argv`` with stdout and stderr in ``<directory>/<name>.log``."""
        log = self.directory / f"{name}.log"
        with open(log, "ab") as out:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,  # a Ctrl-C at the terminal reaches the harness only
                )
            except OSError as exc:
                raise BenchError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
        started = Started(name, popen.pid, popen, log)
        self.started.append(started)
        return started

    def tail(self, started: Started, lines: int = 15) -> str:
        try:
            text = started.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self, started: Started) -> None:
        if started.popen.poll() is not None:
            raise BenchError(
                f"{started.name} (pid {started.pid}) exited with {started.popen.returncode}:\n"
                f"{self.tail(started)}"
            )

    def tree(self, roots: Iterable[int]) -> list[int]:
        """``roots`` and their live descendants (recorded, so they can be stopped by PID)."""
        pids = [pid for pid in roots if _exists(pid)]
        children = _children_map()
        index = 0
        while index < len(pids):
            for child in children.get(pids[index], ()):
                if child not in pids:
                    pids.append(child)
            index += 1
        self.seen_children.update(pids)
        return pids

    def stop(self, started: Started, timeout: float = 5.0) -> None:
        """SIGTERM the process (and its descendants, by PID), SIGKILL what is left after timeout."""
        family = self.tree([started.pid])
        for pid in family:
            _signal(pid, signal.SIGTERM)
        try:
            started.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(started.pid, signal.SIGKILL)
            started.popen.wait(timeout)
        deadline = time.monotonic() + timeout
        for pid in family[1:]:
            while _exists(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _exists(pid):
                _signal(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every started process, newest first; then any recorded descendant still alive."""
        for started in reversed(self.started):
            if started.popen.poll() is None:
                self.stop(started)
        for pid in self.seen_children:
            if _exists(pid) and pid not in {s.pid for s in self.started}:
                _signal(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` (including their reaped children)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the ")" of the command: state is field 3 of stat(5), so utime (14) is index 11.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes(pids: Iterable[int]) -> int:
    """Sum of ``VmHWM`` (each process's own peak resident set) over ``pids``."""
    return sum(_status_kib(pid, "VmHWM:") for pid in pids) * 1024


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of ``VmRSS`` (resident now) over ``pids``."""
    return sum(_status_kib(pid, "VmRSS:") for pid in pids) * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(
    port: int, watch: Sequence[Started], table: ProcessTable, timeout: float
) -> None:
    """Wait until 127.0.0.1:``port`` accepts; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        for started in watch:
            table.check_alive(started)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout:g}s"
                ) from None
            time.sleep(0.05)


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) towards ``wanted``; return the soft limit.

    Children inherit it, so the chains can hold the 10,000-tunnel test's sockets.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
