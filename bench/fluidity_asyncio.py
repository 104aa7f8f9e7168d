"""``python -m bench.fluidity_asyncio server|agent ...``: Fluidity on asyncio's own event loop.

The CLI runs on uvloop; this runs the very same commands on the standard library's loop, for the
``fluidity-asyncio`` row that compares the two (nothing else differs).
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import fluidity.runtime

T = TypeVar("T")
_run = fluidity.runtime.run


def _run_on_asyncio(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    return _run(main, use_uvloop=False)


if __name__ == "__main__":
    # Before the commands are imported: they bind ``run`` from fluidity.runtime at import time.
    fluidity.runtime.run = _run_on_asyncio
    from fluidity.cli import main

    sys.exit(main())
