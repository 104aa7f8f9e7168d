"""``python -m bench.longpath``: one download per chain over a long path, in one run.

Loopback has no distance: a window that would hold a stream back on a real path never does here.
This puts a :mod:`bench.delay_relay` on the hop of each chain that crosses the network in a real
deployment (stunnel client → server, ssh → sshd, pproxy client → server, agent → server; curl →
nginx for the direct row) and times one CONNECT download of a ``--size`` MiB object per chain,
the median of ``--rounds``, every chain in turn within a round. ``fluidity-fixed`` is Fluidity with
``max_stream_window: 0`` (windows stay at ``stream_window``, as before they could grow).

The relay caps every TCP connection across it at ``tcp_rmem``'s maximum per round trip, as a
real path would (see its docstring); the ratios to the direct row say how close each chain gets
to what one TCP connection can do over that path. Writes the table to stdout and
``bench/results/longpath-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import chains as build
from bench.__main__ import _progress, _use_uvloop, round_order, wait_ready
from bench.delay_relay import tcp_window_cap
from bench.measure import curl_download
from bench.procs import BenchError, ProcessTable, Started, cpu_seconds, free_port, wait_listening
from bench.report import environment, publish
from bench.target import start_target
from fluidity.certs import init_pki

CHAINS = ("direct", "stunnel+squid", "ssh+squid", "pproxy", "fluidity-fixed", "fluidity")
MiB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.longpath", description=__doc__)
    parser.add_argument("--rtt", type=float, default=40.0, help="round trip to add, ms")
    parser.add_argument("--size", type=int, default=256, help="MiB per download")
    parser.add_argument("--rounds", type=int, default=3, help="downloads per chain (median)")
    parser.add_argument("--chains", default=",".join(CHAINS), help="comma-separated chains")
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
             "--to", str(port), "--delay", f"{delay:g}"],
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
        speeds: dict[str, list[float]] = {c.name: [] for c in chains}
        cpu: dict[str, float] = dict.fromkeys(speeds, 0.0)
        for round_no in range(args.rounds):
            for chain in round_order(chains, round_no):
                before = cpu_seconds(table.tree(chain.pids))
                size, seconds = curl_download(targets[chain.name], "/long", chain, tunnel=True,
                                              max_time=300, output="/dev/null")  # fmt: skip
                cpu[chain.name] += cpu_seconds(table.tree(chain.pids)) - before
                speeds[chain.name].append(size / seconds / 1e6)
                _progress(f"{round_no + 1} {chain.name}: {size / seconds / 1e6:.1f} MB/s")
        report = render(chains, speeds, cpu, args, started)
        publish(report, f"longpath-{started:%Y%m%d-%H%M%S}.md", save=not args.no_save)
        return 0
    finally:
        table.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def render(
    chains: list[build.Chain],
    speeds: dict[str, list[float]],
    cpu: dict[str, float],
    args: argparse.Namespace,
    started: dt.datetime,
) -> str:
    medians = {name: statistics.median(runs) for name, runs in speeds.items()}
    direct = medians.get("direct")
    fixed = medians.get("fluidity-fixed")
    out = [f"# Fluidity over a long path, {started:%Y-%m-%d %H:%M %Z}", "", *environment()]
    out.append(
        f"- path: {args.rtt:g} ms round trip added by bench.delay_relay on the crossing hop, "
        f"at most {tcp_window_cap() / MiB:g} MiB per TCP connection per round trip (tcp_rmem max); "
        f"one CONNECT download of {args.size} MiB per chain, median of {args.rounds}"
    )
    out += ["", "| chain | MB/s | x direct | x fluidity-fixed | runs (MB/s) | CPU s/GB |"]
    out.append("|---|---:|---:|---:|---|---:|")
    for chain in chains:
        name = chain.name
        speed = medians[name]
        moved_gb = args.size * MiB * len(speeds[name]) / 1e9
        cells = [
            name,
            f"{speed:.1f}",
            f"{speed / direct:.2f}" if direct else "",
            f"{speed / fixed:.2f}" if fixed else "",
            " ".join(f"{x:.1f}" for x in speeds[name]),
            f"{cpu[name] / moved_gb:.2f}" if chain.pids else "",
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
