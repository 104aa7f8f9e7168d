"""Running a long-lived role: the event loop (uvloop where available) and shutdown signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on uvloop if it is installed, else on asyncio's loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def shutdown_event() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM (the second one exits at once)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def on_signal() -> None:
        if event.is_set():
            raise SystemExit(1)
        event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(on_signal))
    return event
