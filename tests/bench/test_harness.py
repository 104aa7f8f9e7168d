"""The benchmark harness's own logic: process accounting by PID and the report's ratios and goals.

The chains themselves are exercised by ``make bench-smoke`` (it needs Debian packages); these
tests need nothing but Python and run in ``make test`` with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest
from bench.__main__ import check_commands, round_order
from bench.chains import Chain, baseline_source
from bench.delay_relay import Bottleneck, tcp_window_cap
from bench.longpath import Runs
from bench.longpath import render as render_long_path
from bench.many import ManyResult
from bench.procs import BenchError, ProcessTable, cpu_seconds, free_port, peak_rss_bytes
from bench.report import ChainResult, goals, table

MiB = 1024 * 1024


def _results(**fluidity: float) -> list[ChainResult]:
    direct = ChainResult("direct", connect_mbps=1000, rate_c64=40000, p50_ms=0.05)
    squid = ChainResult("squid", connect_mbps=500, rate_c64=10000)
    stunnel = ChainResult("stunnel+squid", connect_mbps=300, tunnels_per_s=500)
    pproxy = ChainResult("pproxy", connect_mbps=200, rate_c64=8000)
    values = {"connect_mbps": 600.0, "rate_c64": 13000.0, "p50_ms": 0.25, "tunnels_per_s": 2600.0}
    values.update(fluidity)
    return [direct, squid, stunnel, pproxy, ChainResult("fluidity", **values)]  # type: ignore[arg-type]


def test_table_shows_each_figure_with_its_ratio_to_the_direct_row() -> None:
    text = table(_results())
    fluidity_row = next(line for line in text.splitlines() if line.startswith("| fluidity"))
    assert "600 (0.60x)" in fluidity_row
    assert "13,000 (0.33x)" in fluidity_row
    direct_row = next(line for line in text.splitlines() if line.startswith("| direct"))
    assert "1,000 (1.00x)" in direct_row


def test_goals_say_met_when_every_threshold_is_passed() -> None:
    many = ManyResult(10000, 10000, 10000, 3.0, 150 * MiB, 160 * MiB, 170 * MiB)
    lines = goals(_results(), many)
    assert lines and all("**met**" in line for line in lines), lines


def test_goals_name_each_miss_with_its_figure() -> None:
    many = ManyResult(10000, 10000, 9990, 3.0, 150 * MiB, 160 * MiB, 250 * MiB)
    lines = goals(_results(connect_mbps=450.0, rate_c64=9000.0, p50_ms=0.4), many)
    missed = [line for line in lines if "NOT met" in line]
    assert any("CONNECT bulk" in line and "squid 500" in line for line in missed)
    assert any("1.5 x pproxy" in line and "1.12x" in line for line in missed)
    assert any("p50" in line and "0.400 ms" in line for line in missed)
    assert any("9,990 used" in line for line in missed)


def test_processes_are_measured_and_stopped_by_pid(tmp_path: Path) -> None:
    table_ = ProcessTable(tmp_path)
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = table_.start(
        "parent",
        [sys.executable, "-c", f"import subprocess, sys, time\n"
         f"subprocess.Popen([sys.executable, '-c', {busy + 'time.sleep(60)'!r}])\n"
         "time.sleep(60)\n"],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while len(table_.tree([child.pid])) < 2 or cpu_seconds(table_.tree([child.pid])) < 0.2:
        assert time.monotonic() < deadline, "the grandchild never showed up or never ran"
        time.sleep(0.05)
    family = table_.tree([child.pid])
    assert peak_rss_bytes(family) > 0
    table_.stop_all()
    for pid in family:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid), f"{pid} still runs"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "Z"


def test_a_baseline_must_be_a_fluidity_checkout(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"no src/fluidity/__main__\.py there.*git worktree add"):
        baseline_source(tmp_path)
    (tmp_path / "src" / "fluidity").mkdir(parents=True)
    (tmp_path / "src" / "fluidity" / "__main__.py").write_text("")
    assert baseline_source(tmp_path) == tmp_path.resolve()


def test_rounds_visit_the_chains_forwards_then_backwards() -> None:
    chains = [Chain(name, None, [], "") for name in ("direct", "squid", "fluidity")]
    orders = [[c.name for c in round_order(chains, n)] for n in range(3)]
    assert orders == [
        ["direct", "squid", "fluidity"],
        ["fluidity", "squid", "direct"],
        ["direct", "squid", "fluidity"],
    ]


def test_an_unknown_chain_is_named_with_the_choices() -> None:
    with pytest.raises(BenchError, match=r"unknown chain\(s\) \['stunnel-squid'\]; choose from"):
        check_commands(["direct", "stunnel-squid"])


# --- the long-path relay and report ---------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_tcp_window_cap_is_read_from_the_kernel() -> None:
    expected = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    assert tcp_window_cap() == expected


async def _start_relay(*options: str) -> tuple[asyncio.subprocess.Process, int, asyncio.Server]:
    """An echo server behind a delay relay started with ``options``: process, port, server."""
    server, port = await _echo_server()
    listen = free_port()
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.delay_relay", "--listen", str(listen), "--to", str(port),
        *options,
    )  # fmt: skip
    return relay, listen, server


async def _connect(listen: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(100):  # up to 5 s for the relay to listen
        try:
            return await asyncio.open_connection("127.0.0.1", listen)
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("the relay never listened")


async def _stop_relay(relay: asyncio.subprocess.Process, server: asyncio.Server) -> None:
    relay.terminate()
    await relay.wait()
    server.close()
    await server.wait_closed()


async def test_delay_relay_moves_bytes_exactly_both_ways_and_holds_them_back() -> None:
    relay, listen, server = await _start_relay("--delay", "0.05", "--window", str(256 * 1024))
    try:
        reader, writer = await _connect(listen)
        started = time.monotonic()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        # The relay holds each direction back 50 ms: the echo's round trip is at least 100 ms.
        assert time.monotonic() - started >= 0.1
        payload = os.urandom(2 * MiB)  # 8 windows: the relay must release space as acks return
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(-1), 30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        writer.close()
    finally:
        await _stop_relay(relay, server)


def test_a_bottleneck_sends_what_it_is_handed_one_after_the_other_at_its_rate() -> None:
    line = Bottleneck(rate=1000.0)  # bytes/s
    assert line.departure(0.0, 1000) == pytest.approx(1.0)
    # Handed over while the first 1000 bytes are still leaving: queued behind them.
    assert line.departure(0.5, 500) == pytest.approx(1.5)
    # Handed over once the line is idle again: leaves after its own sending time only.
    assert line.departure(3.0, 100) == pytest.approx(3.1)


async def test_a_rate_capped_relay_paces_the_bytes_and_keeps_them_whole() -> None:
    relay, listen, server = await _start_relay(
        "--delay", "0.001", "--rate", str(4 * MiB), "--window", str(MiB)
    )
    try:
        reader, writer = await _connect(listen)
        payload = os.urandom(MiB)
        started = time.monotonic()
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(-1), 30)
        # 1 MiB through a 4 MiB/s line cannot take less than a quarter of a second.
        assert time.monotonic() - started >= 0.25
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        writer.close()
    finally:
        await _stop_relay(relay, server)


def test_long_path_report_gives_ratios_to_direct_and_to_fixed_windows() -> None:
    chains = [
        Chain("direct", None),
        Chain("fluidity-fixed", 1, [], "fixed"),
        Chain("fluidity", 2, [], "growing"),
    ]
    runs = {
        "direct": Runs([400.0, 500.0, 450.0], [40.5, 41.0], [41.0, 45.0, 300.0]),
        "fluidity-fixed": Runs([25.0], [41.0], [42.0], cpu_seconds=1.0),
        "fluidity": Runs([225.0], [41.0], [float(ms) for ms in range(50, 150)], cpu_seconds=1.0),
    }
    args = argparse.Namespace(rtt=40.0, size=64, rounds=3, rate=0.0)
    started = dt.datetime(2026, 12, 7, 20, 0, tzinfo=dt.UTC)
    text = render_long_path(chains, runs, args, started)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["direct"] == (
        "| direct | 450.0 | 1.00 | 18.00 | 400.0 500.0 450.0 |  | 40.8 | 45.0 | 300.0 |"
    )
    # 100 loaded samples 50..149 ms: median 99.5, the 99th percentile 149.
    assert rows["fluidity"].startswith("| fluidity | 225.0 | 0.50 | 9.00 | 225.0 | ")
    assert rows["fluidity"].endswith(" | 41.0 | 99.5 | 149.0 |")
    assert "40 ms round trip" in text
    assert "no bandwidth cap" in text


def test_long_path_report_names_the_bottleneck() -> None:
    runs = {"direct": Runs([10.0], [40.0], [90.0])}
    args = argparse.Namespace(rtt=40.0, size=64, rounds=1, rate=12.5)
    text = render_long_path([Chain("direct", None)], runs, args, dt.datetime.now(dt.UTC))
    assert "a 12.5 MB/s bottleneck each way" in text
