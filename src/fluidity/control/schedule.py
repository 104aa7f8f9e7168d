"""The control plane's schedule: an idle check every ``sleep_check_interval``, a daily kill.

On AWS, EventBridge rules invoke the sleep and kill Lambdas; ``fluidity control serve`` runs this
schedule itself. Times are UTC. The decisions are the controller's; this module only says when.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from fluidity.control.core import BackendError, Controller
from fluidity.errors import ConfigError
from fluidity.logs import log

logger = logging.getLogger("fluidity.control")

_HHMM = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


def parse_daily_time(text: str) -> tuple[int, int] | None:
    """``"23:00"`` -> ``(23, 0)``; empty -> ``None`` (no daily kill)."""
    if not text.strip():
        return None
    match = _HHMM.match(text)
    if not match:
        raise ConfigError(
            f"daily_kill_time {text!r} is not a UTC time HH:MM (like 23:00); empty disables it"
        )
    return int(match.group(1)), int(match.group(2))


def seconds_until_daily(now: float, hour: int, minute: int) -> float:
    """Seconds from ``now`` (Unix time) to the next ``hour:minute`` UTC strictly after it."""
    current = datetime.fromtimestamp(now, tz=UTC)
    target = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= current:
        target += timedelta(days=1)
    return (target - current).total_seconds()


class Schedule:
    """Runs ``controller.sleep()`` every ``sleep_interval`` and ``controller.kill()`` daily."""

    def __init__(
        self,
        controller: Controller,
        *,
        sleep_interval: float,
        daily_kill: tuple[int, int] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.sleep_interval = sleep_interval
        self.daily_kill = daily_kill
        self.clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sleep_interval > 0:
            self._tasks.append(loop.create_task(self._sleep_checks()))
        if self.daily_kill is not None:
            self._tasks.append(loop.create_task(self._daily_kills()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _sleep_checks(self) -> None:
        while True:
            await asyncio.sleep(self.sleep_interval)
            await self._run("sleep", self.controller.sleep)

    async def _daily_kills(self) -> None:
        assert self.daily_kill is not None
        hour, minute = self.daily_kill
        while True:
            await asyncio.sleep(seconds_until_daily(self.clock(), hour, minute))
            await self._run("kill", self.controller.kill)

    @staticmethod
    async def _run(name: str, operation: Callable[[], object]) -> None:
        try:
            await asyncio.to_thread(operation)
        except BackendError as exc:
            log(logger, logging.ERROR, "schedule.failed", operation=name, reason=str(exc))
