"""``python -m bench``: Fluidity against the tools people use instead, in one run.

``python -m bench`` (``make bench``) measures every chain back to back and writes a markdown table
with ratios to the direct row to stdout and ``bench/results/<timestamp>.md``. ``python -m bench
--smoke`` (``make bench-smoke``) starts every chain and only checks that each moves bytes
correctly (seconds; no timing is asserted). Figures are measured in rounds, every chain in turn
within a round, so slow drift of the shared machine affects all chains alike: bulk cells are the
median of ``--rounds`` downloads, request and tunnel cells the median of ``--load-rounds`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.chains import (
    CHAIN_NAMES,
    REQUIRED_COMMANDS,
    Chain,
    Context,
    baseline_source,
    build_all,
)
from bench.many import ManyResult, many_tunnels
from bench.measure import TunnelResult, WrkResult, curl_download, fetch, tunnels, wrk
from bench.procs import BenchError, ProcessTable, cpu_seconds, peak_rss_bytes, raise_open_files
from bench.report import ChainResult, environment, goals, publish, table
from bench.target import Target, start_target
from fluidity.certs import init_pki

MiB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="correctness only, in seconds")
    parser.add_argument("--chains", default=",".join(CHAIN_NAMES), help="comma-separated chains")
    parser.add_argument("--rounds", type=int, default=3, help="bulk downloads per chain and mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk/tunnel run")
    parser.add_argument(
        "--load-rounds", type=int, default=3, help="c1/c64/tunnel runs per chain (median)"
    )
    parser.add_argument("--tunnels", type=int, default=10_000, help="many-tunnels test size")
    parser.add_argument("--hold", type=float, default=30.0, help="many-tunnels hold time (s)")
    parser.add_argument("--skip-many", action="store_true", help="skip the many-tunnels test")
    parser.add_argument("--skip-bulk", action="store_true", help="skip the 512 MiB downloads")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the Fluidity code in DIR (a checkout of another commit) as the chain "
        "fluidity-baseline, in the same rounds",
    )
    return parser.parse_args(argv)


def check_commands(names: list[str]) -> None:
    unknown = [name for name in names if name not in REQUIRED_COMMANDS]
    if unknown:
        raise BenchError(f"unknown chain(s) {unknown}; choose from {', '.join(CHAIN_NAMES)}")
    needed = {"nginx", "curl", "wrk"}
    for name in names:
        needed.update(REQUIRED_COMMANDS[name])
    missing = sorted(c for c in needed if not shutil.which(c))
    if missing:
        raise BenchError(
            f"missing commands: {', '.join(missing)}. `make bench` / `make bench-smoke` install "
            "them (Debian: nginx-light tinyproxy squid stunnel4 openssh-server openssh-client "
            "wrk curl), or pick chains with --chains"
        )


async def wait_ready(chain: Chain, target: Target, timeout: float = 20.0) -> None:
    """Retry a small GET until the chain answers (Fluidity's link comes up after its port)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with asyncio.timeout(5):
                if await fetch(chain, target, "/small", tunnel=False):
                    return
        except (OSError, BenchError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"{chain.name} not ready after {timeout:g}s: {exc}") from None
            await asyncio.sleep(0.1)


async def smoke(chains: list[Chain], target: Target, table_: ProcessTable) -> list[str]:
    """A few transfers per chain, each checked byte for byte; return one line per chain."""
    lines = []
    for chain in chains:
        checks = 0
        for path in ("/small", "/medium"):
            for tunnel in (False, True):
                body = await fetch(chain, target, path, tunnel=tunnel)
                if hashlib.sha256(body).hexdigest() != target.digests[path]:
                    mode = "CONNECT" if tunnel else "plain"
                    raise BenchError(f"{chain.name}: {path} via {mode}: wrong bytes")
                checks += 1
        for tunnel in (False, True):
            out = table_.directory / "curl.out"
            curl_download(target, "/medium", chain, tunnel=tunnel, max_time=30, output=str(out))
            if hashlib.sha256(out.read_bytes()).hexdigest() != target.digests["/medium"]:
                raise BenchError(f"{chain.name}: curl /medium: wrong bytes")
            checks += 1
        result = wrk(target, chain, connections=1, seconds=1)
        if result.requests == 0:
            raise BenchError(f"{chain.name}: wrk completed no request")
        lines.append(f"ok {chain.name}: {checks} transfers byte-exact, wrk {result.requests} GETs")
    return lines


def round_order(chains: list[Chain], round_no: int) -> list[Chain]:
    """The chains in the order of one round: forwards, then backwards, in turn.

    A load leaves traces that slow the next chain for a moment (sockets in TIME_WAIT, a
    process still winding down): in one fixed order, the chain after pproxy lost about 10 % of
    its new tunnels per second to the chain after it in every round. Alternating the direction
    gives every chain both neighbours.
    """
    return chains if round_no % 2 == 0 else chains[::-1]


def measure(
    chains: list[Chain], target: Target, table_: ProcessTable, args: argparse.Namespace
) -> dict[str, ChainResult]:
    results = {c.name: ChainResult(c.name, c.note) for c in chains}

    def chain_cpu(chain: Chain) -> float:
        return cpu_seconds(table_.tree(chain.pids))

    if not args.skip_bulk:
        speeds: dict[tuple[str, bool], list[float]] = {}
        cpu_bulk: dict[str, tuple[float, int]] = {}
        for round_no in range(args.rounds):
            for chain in round_order(chains, round_no):
                modes = (True,) if chain.proxy_port is None else (True, False)
                for tunnel in modes:
                    before = chain_cpu(chain)
                    size, seconds = curl_download(
                        target, "/bulk", chain, tunnel=tunnel, max_time=300, output="/dev/null"
                    )
                    used = chain_cpu(chain) - before
                    speeds.setdefault((chain.name, tunnel), []).append(size / seconds / 1e6)
                    if tunnel:
                        cpu, moved = cpu_bulk.get(chain.name, (0.0, 0))
                        cpu_bulk[chain.name] = (cpu + used, moved + size)
                    mode = "CONNECT" if tunnel else "plain"
                    rate = size / seconds / 1e6
                    _progress(f"bulk {round_no + 1} {chain.name} {mode}: {rate:.0f} MB/s")
        for chain in chains:
            result = results[chain.name]
            result.connect_mbps = statistics.median(speeds[(chain.name, True)])
            plain = speeds.get((chain.name, False), speeds[(chain.name, True)])
            result.plain_mbps = statistics.median(plain)
            if chain.pids:
                cpu, moved = cpu_bulk[chain.name]
                result.cpu_s_per_gb = cpu / (moved / 1e9)

    # The request and tunnel loads run in rounds, each round every chain in turn, and each figure
    # is the median of its rounds: one 5 s run moved c64 cells by a third between back-to-back
    # runs on a shared VM, and interleaving spreads slow drift over all chains alike.
    c1_runs: dict[str, list[WrkResult]] = {c.name: [] for c in chains}
    c64_runs: dict[str, list[tuple[WrkResult, float]]] = {c.name: [] for c in chains}
    tunnel_runs: dict[str, list[TunnelResult]] = {c.name: [] for c in chains}
    for round_no in range(args.load_rounds):
        order = round_order(chains, round_no)
        for chain in order:
            c1 = wrk(target, chain, connections=1, seconds=args.seconds)
            c1_runs[chain.name].append(c1)
            _progress(f"c1 {round_no + 1} {chain.name}: p50 {c1.p50_ms:.3f} ms "
                      f"p99 {c1.p99_ms:.3f} ms")  # fmt: skip
        for chain in order:
            before = chain_cpu(chain)
            c64 = wrk(target, chain, connections=64, seconds=args.seconds)
            c64_runs[chain.name].append((c64, chain_cpu(chain) - before))
            _progress(f"c64 {round_no + 1} {chain.name}: {c64.rate:,.0f} req/s, "
                      f"{c64.errors} errors")  # fmt: skip
        for chain in order:
            tun = asyncio.run(
                tunnels(chain, target, concurrency=16, seconds=args.seconds, ttfb_samples=200)
            )
            tunnel_runs[chain.name].append(tun)
            _progress(f"tunnels {round_no + 1} {chain.name}: {tun.rate:,.0f}/s, "
                      f"TTFB {tun.ttfb_p50_ms:.3f} ms")  # fmt: skip
    for chain in chains:
        result = results[chain.name]
        c1s = c1_runs[chain.name]
        result.p50_ms = statistics.median(r.p50_ms for r in c1s)
        result.p99_ms = statistics.median(r.p99_ms for r in c1s)
        if errors := sum(r.errors for r in c1s):
            result.problems.append(f"c1: {errors} errors")
        c64s = c64_runs[chain.name]
        result.rate_c64 = statistics.median(r.rate for r, _ in c64s)
        requests = sum(r.requests for r, _ in c64s)
        if chain.pids and requests:
            result.cpu_us_per_request = sum(used for _, used in c64s) / requests * 1e6
        if errors := sum(r.errors for r, _ in c64s):
            result.problems.append(f"c64: {errors} errors of {requests} requests")
        tuns = tunnel_runs[chain.name]
        result.tunnels_per_s = statistics.median(t.rate for t in tuns)
        result.ttfb_ms = statistics.median(t.ttfb_p50_ms for t in tuns)
        if failures := sum(t.failures for t in tuns):
            result.problems.append(f"tunnels: {failures} failures")
    for chain in chains:
        if chain.pids:
            results[chain.name].peak_rss_mb = peak_rss_bytes(table_.tree(chain.pids)) / MiB
    return results


def _progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.chains.split(",") if n.strip()]
    check_commands(names)
    many_wanted = not (args.smoke or args.skip_many) and "fluidity" in names
    raise_open_files(4 * args.tunnels + 4096 if many_wanted else 16384)
    _use_uvloop()
    root = Path(tempfile.mkdtemp(prefix="fluidity-bench-"))
    os.chmod(root, 0o755)
    table_ = ProcessTable(root)
    load_before = os.getloadavg()
    started = dt.datetime.now().astimezone()
    try:
        pki = init_pki(root / "certs")
        connections = args.tunnels + 1024 if many_wanted else 4096
        target = start_target(table_, root, bulk=not (args.smoke or args.skip_bulk),
                              connections=connections)  # fmt: skip
        baseline = baseline_source(args.baseline) if args.baseline is not None else None
        chains = build_all(Context(table_, root, pki), names, baseline)
        for chain in chains:
            asyncio.run(wait_ready(chain, target))
        if args.smoke:
            for line in asyncio.run(smoke(chains, target, table_)):
                print(line)
            print(f"bench-smoke: {len(chains)} chains moved the bytes correctly")
            return 0
        results = measure(chains, target, table_, args)
        many: ManyResult | None = None
        if many_wanted:
            fl = next(c for c in chains if c.name == "fluidity")
            many = asyncio.run(many_tunnels(fl, target, count=args.tunnels, hold=args.hold))
            _progress(f"many: {many}")
        report = render(
            [results[c.name] for c in chains], many, started, load_before, os.getloadavg()
        )
        publish(report, f"{started:%Y%m%d-%H%M%S}.md", save=not args.no_save)
        return 0
    finally:
        table_.stop_all()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def render(
    results: list[ChainResult],
    many: ManyResult | None,
    started: dt.datetime,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    out = [f"# Fluidity benchmark, {started:%Y-%m-%d %H:%M %Z}", "", *environment()]
    out.append(
        f"- load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after"
    )
    out += ["", table(results), ""]
    notes = [f"- {r.name}: {r.note}" + (f" — {'; '.join(r.problems)}" if r.problems else "")
             for r in results]  # fmt: skip
    out += ["Chains:", *notes, "", "Goals (issue #3):", *goals(results, many), ""]
    return "\n".join(out)


def _use_uvloop() -> None:
    """The harness's own asyncio clients run on uvloop (less client overhead per tunnel)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
