"""The local backend: "desired count" 0 or 1 of a ``fluidity server`` process on this machine.

Setting the desired count to 1 starts the server (its admin endpoint turned on at
``127.0.0.1:<admin_port>`` through ``FLUIDITY_ADMIN_ADDR``/``FLUIDITY_ADMIN_PORT``); 0 sends it
SIGTERM, and SIGKILL if it has not exited ``stop_timeout`` seconds later. Like the ECS scheduler,
a server that exits while wanted is started again (at most once per ``RESTART_BACKOFF`` seconds,
doubling up to ``RESTART_BACKOFF_MAX``). The server counts as running once its admin endpoint
answers (it starts after the listener is bound); activity is read from its ``GET /status``.

Thread-safe: the control API calls it from worker threads. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fluidity.control.core import Activity, BackendError, Observation
from fluidity.logs import log

logger = logging.getLogger("fluidity.control")

PROBE_TIMEOUT = 2.0
"""Seconds one read of the server's admin endpoint may take."""
RESTART_BACKOFF = 1.0
"""First pause (seconds) before starting again a server that exited while wanted."""
RESTART_BACKOFF_MAX = 30.0
"""Longest pause between restarts of a server that keeps exiting."""
# Never send the admin probe through a proxy from the environment: it is on loopback, and the
# environment's proxy may well be the agent this control plane serves.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalBackend:
    """Starts and stops one server process; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        admin_port: int = 0,
        public_host: str = "127.0.0.1",
        stop_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.command = list(command)
        self.admin_port = admin_port or free_loopback_port()
        self.public_host = public_host
        self.stop_timeout = stop_timeout
        self._env = dict(os.environ if env is None else env)
        self._clock = clock
        self._lock = threading.RLock()
        self._desired = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at: float | None = None
        self._term_sent_at: float | None = None
        self._restart_delay = RESTART_BACKOFF
        self._restart_at = 0.0
        self.starts = 0  # processes started, for tests and logs

    # --- Backend ---------------------------------------------------------------------------------

    def observe(self) -> Observation:
        with self._lock:
            self._reconcile()
            alive = self._alive()
            status = self._status() if alive else None
            desired = self._desired
            started = self._started_at
        answering = status is not None
        if status is not None and isinstance(status.get("started_at"), int | float):
            started = float(status["started_at"])
        running = 1 if desired and alive and answering else 0
        return Observation(
            desired=desired,
            running=running,
            pending=1 if desired and alive and not answering else 0,
            stopping=1 if not desired and alive else 0,
            public_ip=self.public_host if running else None,
            started_at=started if alive else None,
        )

    def set_desired(self, count: int) -> None:
        with self._lock:
            self._desired = 1 if count > 0 else 0
            self._restart_at = 0.0
            self._restart_delay = RESTART_BACKOFF
            self._reconcile()

    def activity(self, now: float) -> Activity:
        with self._lock:
            status = self._status() if self._alive() else None
        if status is None:
            return Activity(last_activity=None)
        last = status.get("last_activity")
        agents = status.get("agents") or {}
        return Activity(
            last_activity=float(last) if isinstance(last, int | float) else None,
            agents={str(k): float(v) for k, v in agents.items() if isinstance(v, int | float)},
        )

    # --- process management ----------------------------------------------------------------------

    def reconcile(self) -> None:
        """Restart a wanted server that exited; SIGKILL one that ignores SIGTERM (call often)."""
        with self._lock:
            self._reconcile()

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _reconcile(self) -> None:
        process, now = self._process, self._clock()
        if self._desired and not self._alive():
            if process is not None and self._term_sent_at is None:
                if self._restart_at == 0.0:
                    delay = f"{self._restart_delay:g}s"
                    log(logger, logging.WARNING, "local.server_exited",
                        status=process.returncode, restart_in=delay)  # fmt: skip
                    self._restart_at = now + self._restart_delay
                    self._restart_delay = min(RESTART_BACKOFF_MAX, self._restart_delay * 2)
                if now < self._restart_at:
                    return
            self._start()
        elif not self._desired and self._alive():
            assert process is not None
            if self._term_sent_at is None:
                process.send_signal(signal.SIGTERM)
                self._term_sent_at = now
                log(logger, logging.INFO, "local.server_stopping", pid=process.pid)
            elif now - self._term_sent_at > self.stop_timeout:
                process.kill()
                log(logger, logging.WARNING, "local.server_killed", pid=process.pid,
                    reason=f"still running {self.stop_timeout:g}s after SIGTERM")  # fmt: skip

    def _start(self) -> None:
        env = dict(self._env)
        env["FLUIDITY_ADMIN_ADDR"] = "127.0.0.1"
        env["FLUIDITY_ADMIN_PORT"] = str(self.admin_port)
        try:
            self._process = subprocess.Popen(self.command, env=env, start_new_session=True)
        except OSError as exc:
            raise BackendError(
                f"cannot start the server ({self.command[0]}): {exc.strerror}"
            ) from None
        self._started_at = self._clock()
        self._term_sent_at = None
        self._restart_at = 0.0
        self.starts += 1
        log(logger, logging.INFO, "local.server_started", pid=self._process.pid,
            admin_port=self.admin_port)  # fmt: skip

    def _status(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.admin_port}/status"
        try:
            with _DIRECT.open(url, timeout=PROBE_TIMEOUT) as response:
                document = json.loads(response.read(1 << 20))
        except (OSError, urllib.error.URLError, ValueError):
            return None  # not listening yet (or any more)
        return document if isinstance(document, dict) else None

    def close(self, timeout: float | None = None) -> None:
        """Stop the server and wait for it (SIGKILL after ``stop_timeout``)."""
        with self._lock:
            self._desired = 0
            self._reconcile()
            process = self._process
        if process is None:
            return
        try:
            process.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
