"""Keepalive book-keeping for a link (sans-I/O: the caller passes the time in seconds)."""

from __future__ import annotations

import enum


class KeepaliveAction(enum.Enum):
    NONE = "none"
    PING = "ping"
    DEAD = "dead"


class Keepalive:
    """Decide when to PING and when to declare a silent link dead.

    interval: seconds between PINGs (default 15 s).
    timeout: seconds without receiving any byte after which the link is dead (default 30 s,
        well under the 60 s after which AWS load balancers drop idle connections). Any frame
        counts as a sign of life, so a busy link needs no PING answers to stay up.
    """

    __slots__ = ("_last_ping", "_last_received", "interval", "timeout")

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("keepalive interval and timeout must be positive")
        self.interval = interval
        self.timeout = timeout
        self._last_received = now
        self._last_ping = now

    def received(self, now: float) -> None:
        """Record that bytes arrived from the peer."""
        self._last_received = now

    def poll(self, now: float) -> KeepaliveAction:
        """What to do at time ``now``; after PING the next one is due ``interval`` later."""
        if now - self._last_received >= self.timeout:
            return KeepaliveAction.DEAD
        if now - self._last_ping >= self.interval:
            self._last_ping = now
            return KeepaliveAction.PING
        return KeepaliveAction.NONE

    def next_check(self, now: float) -> float:
        """Seconds from ``now`` until :meth:`poll` may have something to do."""
        due = min(self._last_ping + self.interval, self._last_received + self.timeout)
        return max(0.0, due - now)
