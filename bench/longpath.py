"""``python -m bench.longpath``: one download per chain over a long path, in one run.

Loopback has no distance: a window that would hold a stream back on a real path never does here.
This puts a :mod:`bench.delay_relay` on the hop of each chain that crosses the network in a real
deployment (stunnel client → server, ssh → sshd, pproxy client → server, agent → server; curl →
nginx for the direct row) and times one CONNECT download of a ``--size`` MiB object per chain,
the median of ``--rounds``, every chain in turn within a round. ``fluidity-fixed`` is Fluidity with
``max_stream_window: 0`` (windows stay at ``stream_window``, as before they could grow).

The relay caps every TCP connection across it at ``tcp_rmem``'s maximum per round trip, as a
real path would (see its docstring); the ratios to the direct row say how close each chain gets
to what one TCP connection can do over that path. ``--rate`` makes the path a bottleneck of that
many MB/s each way, shared by the chain's connections (a user's line; its queue has no limit).

While each download runs, a second connection through the same chain (a CONNECT tunnel; for
the direct row a TCP connection across the same relay) sends a small keep-alive GET every
:data:`PROBE_INTERVAL` seconds: its round trips, against those of the same probe on the idle
path, say how long a page the user opens meanwhile waits behind the download (the queue a
chain keeps on the path, and in its own connection if it multiplexes). Writes the table to
stdout and ``bench/results/longpath-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import chains as build
from bench.__main__ import _progress, _use_uvloop, round_order, wait_ready
from bench.delay_relay import tcp_window_cap
from bench.measure import curl_download, open_tunnel, read_small_response, small_request
from bench.procs import BenchError, ProcessTable, Started, cpu_seconds, free_port, wait_listening
from bench.report import environment, publish
from bench.target import Target, start_target
from fluidity.certs import init_pki

CHAINS = ("direct", "stunnel+squid", "ssh+squid", "pproxy", "fluidity-fixed", "fluidity")
MiB = 1024 * 1024
PROBE_INTERVAL = 0.05
"""Seconds between the small requests that measure latency during a download."""
IDLE_PROBES = 10
"""Small requests sent on the idle path before each download (its latency without load)."""
PROBE_TIMEOUT = 30.0
"""Seconds one small request may take before the run fails (a queue that long is a finding)."""


@dataclasses.dataclass
class Runs:
    """What one chain showed over the rounds: download speeds and probe round trips."""

    speeds: list[float] = dataclasses.field(default_factory=list)  # MB/s, one per round
    idle_ms: list[float] = dataclasses.field(default_factory=list)
    loaded_ms: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.longpath", description=__doc__)
    parser.add_argument("--rtt", type=float, default=40.0, help="round trip to add, ms")
    parser.add_argument("--size", type=int, default=256, help="MiB per download")
    parser.add_argument("--rounds", type=int, default=3, help="downloads per chain (median)")
    parser.add_argument("--chains", default=",".join(CHAINS), help="comma-separated chains")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="bottleneck on the path, MB/s each way (0 = none)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return parser.parse_args(argv)


def _chain(ctx: build.Context, name: str) -> build.Chain:
    if name == "stunnel+squid":
        return build.stunnel(ctx, build.squid(ctx, "squid-b"), name)
    if name == "ssh+squid":
        return build.ssh(ctx, build.squid(ctx, "squid-c"))
    if name == "pproxy":
        return build.pproxy(ctx)
    if name == "fluidity":
        return build.fluidity(ctx)
    if name == "fluidity-fixed":
        chain = build.fluidity(ctx, name, extra_config="max_stream_window: 0\n")
        chain.note += ", max_stream_window: 0 (fixed 1 MiB windows)"
        return chain
    raise BenchError(f"unknown chain {name!r}; choose from {', '.join(CHAINS)}")


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.chains.split(",") if n.strip()]
    _use_uvloop()
    root = Path(tempfile.mkdtemp(prefix="fluidity-longpath-"))
    root.chmod(0o755)
    table = ProcessTable(root)
    started = dt.datetime.now().astimezone()
    delay = args.rtt / 2000
    relays: list[Started] = []

    def hop(name: str, port: int) -> int:
        listen = free_port()
        relay = table.start(
            f"{name}-relay",
            [sys.executable, "-m", "bench.delay_relay", "--listen", str(listen),
             "--to", str(port), "--delay", f"{delay:g}", "--rate", f"{args.rate * 1e6:g}"],
        )  # fmt: skip
        wait_listening(listen, [relay], table, build.READY_TIMEOUT)
        relays.append(relay)
        return listen

    try:
        ctx = build.Context(table, root, init_pki(root / "certs"), hop=hop)
        target = start_target(table, root, bulk=False, connections=1024,
                              extra={"/long": args.size * MiB})  # fmt: skip
        chains, targets = [], {}
        for name in names:
            if name == "direct":
                chain = build.Chain(
                    "direct", None, [], "curl -> relay -> nginx: one TCP connection"
                )
                targets[name] = dataclasses.replace(target, port=hop(name, target.port))
            else:
                chain = _chain(ctx, name)
                targets[name] = target
            chains.append(chain)
        for chain in chains:
            asyncio.run(wait_ready(chain, targets[chain.name], timeout=30))
        runs = {c.name: Runs() for c in chains}
        for round_no in range(args.rounds):
            for chain in round_order(chains, round_no):
                before = cpu_seconds(table.tree(chain.pids))
                size, seconds = asyncio.run(
                    _download_under_probe(chain, targets[chain.name], runs[chain.name])
                )
                runs[chain.name].cpu_seconds += cpu_seconds(table.tree(chain.pids)) - before
                runs[chain.name].speeds.append(size / seconds / 1e6)
                _progress(f"{round_no + 1} {chain.name}: {size / seconds / 1e6:.1f} MB/s")
        report = render(chains, runs, args, started)
        publish(report, f"longpath-{started:%Y%m%d-%H%M%S}.md", save=not args.no_save)
        return 0
    finally:
        table.stop_all()
        shutil.rmtree(root, ignore_errors=True)


async def _download_under_probe(
    chain: build.Chain, target: Target, runs: Runs
) -> tuple[int, float]:
    """One download of ``/long`` through ``chain`` while a probe times small requests beside it.

    Returns the download's bytes and seconds; appends the probe's round trips (ms) to ``runs``.
    """
    reader, writer = await open_tunnel(chain, target)
    request = small_request(target)

    async def probe() -> float:
        start = time.perf_counter()
        writer.write(request)
        async with asyncio.timeout(PROBE_TIMEOUT):
            await read_small_response(reader, target)
        return (time.perf_counter() - start) * 1000

    try:
        for _ in range(IDLE_PROBES):
            runs.idle_ms.append(await probe())
            await asyncio.sleep(PROBE_INTERVAL)
        curl = functools.partial(
            curl_download, target, "/long", chain, tunnel=True, max_time=300, output="/dev/null"
        )
        download = asyncio.ensure_future(asyncio.to_thread(curl))
        try:
            while not download.done():
                runs.loaded_ms.append(await probe())
                await asyncio.wait((download,), timeout=PROBE_INTERVAL)
        finally:
            if not download.done():
                await asyncio.wait((download,))  # curl is bounded by its --max-time
        return download.result()
    finally:
        writer.close()


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def render(
    chains: list[build.Chain],
    runs: dict[str, Runs],
    args: argparse.Namespace,
    started: dt.datetime,
) -> str:
    medians = {name: statistics.median(r.speeds) for name, r in runs.items()}
    direct = medians.get("direct")
    fixed = medians.get("fluidity-fixed")
    out = [f"# Fluidity over a long path, {started:%Y-%m-%d %H:%M %Z}", "", *environment()]
    out.append(
        f"- path: {args.rtt:g} ms round trip added by bench.delay_relay on the crossing hop, "
        f"at most {tcp_window_cap() / MiB:g} MiB per TCP connection per round trip (tcp_rmem max)"
        + (f", a {args.rate:g} MB/s bottleneck each way" if args.rate else ", no bandwidth cap")
        + f"; one CONNECT download of {args.size} MiB per chain, median of {args.rounds}"
    )
    out.append(
        f"- probe: a small GET every {PROBE_INTERVAL * 1000:g} ms on a second connection through "
        f"the chain during each download (loaded), {IDLE_PROBES} before it (idle); round trips, ms"
    )
    out += [
        "",
        "| chain | MB/s | x direct | x fluidity-fixed | runs (MB/s) | CPU s/GB "
        "| idle p50 ms | loaded p50 ms | loaded p99 ms |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for chain in chains:
        name = chain.name
        speed = medians[name]
        chain_runs = runs[name]
        moved_gb = args.size * MiB * len(chain_runs.speeds) / 1e9
        loaded = chain_runs.loaded_ms
        cells = [
            name,
            f"{speed:.1f}",
            f"{speed / direct:.2f}" if direct else "",
            f"{speed / fixed:.2f}" if fixed else "",
            " ".join(f"{x:.1f}" for x in chain_runs.speeds),
            f"{chain_runs.cpu_seconds / moved_gb:.2f}" if chain.pids else "",
            f"{statistics.median(chain_runs.idle_ms):.1f}" if chain_runs.idle_ms else "",
            f"{statistics.median(loaded):.1f}" if loaded else "",
            f"{_percentile(loaded, 0.99):.1f}" if loaded else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Chains:", *(f"- {c.name}: {c.note}" for c in chains), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"bench.longpath: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
