"""``fluidity cloud logs``: print the server's CloudWatch Logs events, optionally following them.

Events are printed as ``<UTC time> <message>``; ``--follow`` polls every ``poll_interval`` seconds
(CloudWatch Logs has no push API for this) until interrupted, and never prints an event twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from fluidity.cloud.aws import AwsTarget, aws_errors

DEFAULT_LOG_GROUP = "/fluidity/server"
MAX_SEEN = 10_000
"""Event ids remembered to drop duplicates while following (older ones are forgotten)."""


def log_events(
    target: AwsTarget, log_group: str, since_seconds: float, *, now: float | None = None
) -> Iterator[dict[str, Any]]:
    """Events of ``log_group`` from ``since_seconds`` ago, oldest first, across streams."""
    logs = target.client("logs")
    start = int(((time.time() if now is None else now) - since_seconds) * 1000)
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {
            "logGroupName": log_group,
            "startTime": start,
            "interleaved": True,
        }
        if token:
            kwargs["nextToken"] = token
        with aws_errors(f"reading log group {log_group}"):
            page = logs.filter_log_events(**kwargs)
        yield from page.get("events", [])
        # FilterLogEvents may return an empty page that still carries a nextToken (it searches
        # streams in batches): only a missing token means the end.
        token = page.get("nextToken")
        if not token:
            return


def tail(
    target: AwsTarget,
    log_group: str,
    since_seconds: float,
    emit: Callable[[str], None],
    *,
    follow: bool = False,
    poll_interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print events (``emit`` each line); with ``follow``, keep polling. Returns lines printed."""
    seen: dict[str, None] = {}
    printed = 0
    since = since_seconds
    while True:
        newest = 0
        for event in log_events(target, log_group, since):
            event_id = str(event.get("eventId", ""))
            if event_id in seen:
                continue
            seen[event_id] = None
            stamp = int(event.get("timestamp", 0))
            newest = max(newest, stamp)
            emit(f"{format_time(stamp)} {str(event.get('message', '')).rstrip()}")
            printed += 1
        while len(seen) > MAX_SEEN:
            seen.pop(next(iter(seen)))
        if not follow:
            return printed
        if newest:  # next poll from the newest event seen (a little overlap; ids dedupe it)
            since = max(1.0, time.time() - newest / 1000 + 1)
        sleep(poll_interval)


def format_time(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
