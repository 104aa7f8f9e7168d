"""Run pproxy on uvloop, as pproxy intends, with current uvloop releases.

pproxy calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``; uvloop >= 0.22's policy
no longer creates a loop on demand, so pproxy would die at start. This sets one up first.
Usage: ``python -m bench.run_pproxy <pproxy arguments>``.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


def _install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


if __name__ == "__main__":
    uvloop.install = _install
    from pproxy.server import main  # type: ignore[import-untyped]

    sys.exit(main())
