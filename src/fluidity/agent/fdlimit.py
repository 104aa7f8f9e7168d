"""Keep the agent from running out of file descriptors: answer 503 instead of dropping clients.

Each client connection costs the agent one descriptor; streams on the link cost none. A process
that hits its open-file limit (``ulimit -n``, EMFILE) can no longer accept clients properly
(uvloop accepts and drops them with a reset, logging nothing) nor reconnect its link. So the
proxy serves at most ``http.max_connections`` clients at once and answers the next one with
``503`` and a ``Retry-After``, logging why; by default the limit is derived from the open-file
limit with :func:`connection_budget`, leaving :data:`FD_RESERVE` descriptors for links,
reconnects and those very refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from fluidity.logs import log

logger = logging.getLogger("fluidity.agent.http")

FD_RESERVE = 32
"""Descriptors kept out of the client budget: links, reconnects, logs and 503 answers."""
REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two ``http.refused`` log lines while clients keep being turned away."""
_LINGER_SECONDS = 1.0  # time a refused client gets to finish sending its request head


def connection_budget(reserve: int = FD_RESERVE) -> int:
    """Client connections the open-file limit leaves room for; 0 when it is unlimited or unknown.

    The soft ``RLIMIT_NOFILE`` minus the descriptors open now minus ``reserve``, at least 1.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    in_use = 0
    for directory in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            in_use = len(os.listdir(directory))
            break
    return max(1, soft - in_use - reserve)


class ConnectionGate:
    """Turns clients away with 503 once ``limit`` connections are being served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        self._last_logged = -REFUSAL_LOG_INTERVAL

    def full(self, active: int) -> bool:
        """True if a connection that makes ``active`` connections must be refused."""
        return active > self.limit

    async def refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503, let the client finish sending briefly, close. Never raises OSError."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_logged >= REFUSAL_LOG_INTERVAL:
            self._last_logged = now
            log(logger, logging.WARNING, "http.refused",
                reason=f"{self.limit} client connections open (http.max_connections)",
                hint="close idle clients or raise `ulimit -n` / http.max_connections",
                refused=self.refused)  # fmt: skip
        body = (
            f"fluidity: the agent is serving its limit of {self.limit} client connections "
            "(http.max_connections, derived from ulimit -n); retry shortly\n"
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head + body)
            if writer.can_write_eof():
                writer.write_eof()
            # Read what the client still sends, so that closing does not reset the answer away.
            async with asyncio.timeout(_LINGER_SECONDS):
                while await reader.read(64 * 1024):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
