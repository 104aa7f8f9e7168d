"""Counters the server keeps for logs, metrics and the lifecycle's idle decision.

Activity is tunnelled traffic only: a stream opened or a byte carried. An agent that sits
connected and answers keepalive PINGs is idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    active_connections: int
    active_streams: int
    streams_opened: int
    bytes_in: int  # bytes received from agents (towards targets)
    bytes_out: int  # bytes sent to agents (from targets)
    last_activity: float  # Unix time of the last stream open or byte carried; 0 if none


class ServerStats:
    """Live counters; ``snapshot()`` adds the byte totals of open links to those of closed ones."""

    def __init__(self, live_links: Callable[[], Iterable[tuple[int, int]]]) -> None:
        self._live_links = live_links  # yields (bytes_in, bytes_out) per open link
        self.active_connections = 0
        self.active_streams = 0
        self.streams_opened = 0
        self._closed_in = 0
        self._closed_out = 0
        self._last_totals = (0, 0)
        self.last_activity = 0.0

    def stream_opened(self) -> None:
        self.active_streams += 1
        self.streams_opened += 1
        self.last_activity = time.time()

    def stream_closed(self) -> None:
        self.active_streams -= 1

    def link_closed(self, bytes_in: int, bytes_out: int) -> None:
        self._closed_in += bytes_in
        self._closed_out += bytes_out

    def snapshot(self) -> StatsSnapshot:
        bytes_in, bytes_out = self._closed_in, self._closed_out
        for link_in, link_out in self._live_links():
            bytes_in += link_in
            bytes_out += link_out
        if (bytes_in, bytes_out) != self._last_totals:
            # Bytes moved since the last look: that is activity, dated to now.
            self._last_totals = (bytes_in, bytes_out)
            self.last_activity = time.time()
        return StatsSnapshot(
            active_connections=self.active_connections,
            active_streams=self.active_streams,
            streams_opened=self.streams_opened,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            last_activity=self.last_activity,
        )
