"""10,000 concurrent CONNECT tunnels through one agent and one server process, held 30 s, then
each used; all must succeed. Agent and server RSS and descriptors are printed at each stage
(docs/hardening.md has the figures). Marked ``slow``: ``pytest -m slow tests/load``.

Every process holds about one descriptor per tunnel, so the test process raises its soft
open-file limit to the hard one (20,000 on the CI machine), starts the agent and server with the
same limit through ``prlimit``, and runs the echo target in a process of its own.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths
from tests.faults.support import (
    FLUIDITY,
    Proc,
    free_port,
    open_fds,
    rss_kib,
    wait_port,
    write_agent_config,
    write_server_config,
)

TUNNELS = int(os.environ.get("FLUIDITY_LOAD_TUNNELS", "10000"))
HOLD_SECONDS = float(os.environ.get("FLUIDITY_LOAD_HOLD", "30"))
OPENING_CONCURRENCY = 500  # CONNECTs in flight at once while opening (listen backlogs are 1024)
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

pytestmark = pytest.mark.slow


def _raise_fd_limit() -> None:
    if NOFILE != resource.RLIM_INFINITY and NOFILE < TUNNELS + 1000:
        pytest.skip(f"the hard open-file limit ({NOFILE}) is too low for {TUNNELS} tunnels")
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _figures(stage: str, procs: dict[str, Proc]) -> str:
    parts = [
        f"{name} rss={rss_kib(p.pid) / 1024:.1f} MiB fds={open_fds(p.pid)}"
        for name, p in procs.items()
    ]
    return f"{stage}: " + ", ".join(parts)


@pytest.mark.timeout(900)
async def test_ten_thousand_concurrent_tunnels_held_then_used(
    pki: PkiPaths, tmp_path: Path
) -> None:
    _raise_fd_limit()
    server_port, proxy_port = free_port(), free_port()
    server = Proc(tmp_path, "server", [*FLUIDITY, "server", "--config", str(write_server_config(
        tmp_path / "server.yaml", pki, server_port, max_streams_per_connection=TUNNELS + 100,
        keepalive_interval="5s", keepalive_timeout="20s"))], nofile=NOFILE)  # fmt: skip
    agent = Proc(tmp_path, "agent", [*FLUIDITY, "agent", "--config", str(write_agent_config(
        tmp_path / "agent.yaml", pki, server_port, proxy_port,
        http="{header_read_timeout: 60s, idle_timeout: 300s}"))], nofile=NOFILE)  # fmt: skip
    procs = {"agent": agent, "server": server}
    procs_to_stop = [agent, server]
    report: list[str] = []
    try:
        server.start()
        await wait_port(server_port, server)
        agent.start()
        await wait_port(proxy_port, agent)
        report.append(_figures("idle", procs))
        echo_port = free_port()
        echo_script = str(Path(__file__).parent / "echo_server.py")
        echo = Proc(tmp_path, "echo", [sys.executable, echo_script, str(echo_port)], nofile=NOFILE)
        echo.start()
        procs_to_stop.append(echo)
        await wait_port(echo_port, echo)
        gate = asyncio.Semaphore(OPENING_CONCURRENCY)
        request = f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

        async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                assert head.startswith(b"HTTP/1.1 200"), head
                return reader, writer

        started = time.monotonic()
        tunnels = await asyncio.gather(*(open_one() for _ in range(TUNNELS)))
        opened_in = time.monotonic() - started
        report.append(_figures(f"{TUNNELS} tunnels open ({opened_in:.1f}s)", procs))
        await asyncio.sleep(HOLD_SECONDS)
        report.append(_figures(f"after holding {HOLD_SECONDS:g}s", procs))

        async def use(
            index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            async with gate:
                message = f"tunnel {index:05d} still works\n".encode()
                writer.write(message)
                echoed = await asyncio.wait_for(reader.readexactly(len(message)), 60)
                return echoed == message

        started = time.monotonic()
        results = await asyncio.gather(*(use(i, r, w) for i, (r, w) in enumerate(tunnels)))
        used_in = time.monotonic() - started
        report.append(_figures(f"all used ({used_in:.1f}s)", procs))
        for _, writer in tunnels:
            writer.close()
        assert results.count(True) == TUNNELS
        assert agent.popen is not None and agent.popen.poll() is None
        assert server.popen is not None and server.popen.poll() is None
    finally:
        print("\n" + "\n".join(report))
        for proc in procs_to_stop:
            proc.stop()
