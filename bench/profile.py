"""``python -m bench.profile``: where Fluidity's agent and server spend their time under one load.

Starts nginx and the Fluidity chain as ``python -m bench`` does, runs one load (``bulk``: 512 MiB
downloads through CONNECT; ``requests``: wrk with 64 keep-alive connections; ``tunnels``: new
CONNECT tunnels) while ``py-spy record`` samples the agent and the server, then prints the
functions with the most samples (own time, and time including callees) for each process. The
collapsed stacks go to ``bench/results/profile-<load>-<role>.txt`` (flamegraph input).

py-spy needs ptrace rights (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.chains import Chain, Context, fluidity
from bench.measure import curl_download, tunnels, wrk
from bench.procs import BenchError, ProcessTable, Started, cpu_seconds
from bench.target import Target, start_target
from fluidity.certs import init_pki

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(collapsed: Path, top: int) -> list[str]:
    """Top functions by own samples and by inclusive samples, from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # a frame name with a line break in it (rare): not worth parsing
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    lines += ["own time:"] + [
        f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)
    ]
    lines += ["including callees:"] + [
        f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)
    ]
    return lines


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"; line numbers split samples.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def run_load(load: str, seconds: float, chain: Chain, target: Target) -> str:
    """Apply ``load`` for about ``seconds``; return what it did."""
    if load == "bulk":
        deadline = time.monotonic() + seconds
        moved = 0
        while time.monotonic() < deadline:
            size, _ = curl_download(
                target, "/bulk", chain, tunnel=True, max_time=120, output="/dev/null"
            )
            moved += size
        return f"{moved / 1e6:.0f} MB moved"
    if load == "requests":
        result = wrk(target, chain, connections=64, seconds=seconds)
        return f"{result.requests} requests, {result.rate:,.0f}/s"
    if load == "latency":
        result = wrk(target, chain, connections=1, seconds=seconds)
        return f"{result.requests} requests, p50 {result.p50_ms:.3f} ms"
    opened = asyncio.run(tunnels(chain, target, concurrency=16, seconds=seconds, ttfb_samples=50))
    return f"{opened.rate:,.0f} tunnels/s"


def record(
    table: ProcessTable, process: Started, seconds: float, out: Path, *, rate: int, native: bool
) -> Started:
    argv = ["py-spy", "record", "--pid", str(process.pid), "--duration", f"{seconds:g}"]
    argv += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
    # --native shows C frames (OpenSSL, uvloop, syscalls) but must pause the process to sample.
    argv.append("--native" if native else "--nonblocking")
    return table.start(f"py-spy-{process.name}", argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "load", choices=["bulk", "requests", "latency", "tunnels"], help="what to apply"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the load")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed per process")
    parser.add_argument("--label", default="", help="suffix of the output file names")
    parser.add_argument("--native", action="store_true", help="sample C frames too (slower)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    os.environ["PATH"] = f"{Path(py_spy).parent}:{os.environ['PATH']}"
    root = Path(tempfile.mkdtemp(prefix="fluidity-profile-"))
    os.chmod(root, 0o755)
    table = ProcessTable(root)
    RESULTS.mkdir(exist_ok=True)
    try:
        target = start_target(table, root, bulk=args.load == "bulk", connections=4096)
        chain = fluidity(Context(table, root, init_pki(root / "certs")))
        curl_download(target, "/small", chain, tunnel=False, max_time=20, output="/dev/null")
        outputs = {}
        spies = []
        for process in chain.processes:
            role = process.name.removeprefix("fluidity-")
            outputs[role] = RESULTS / f"profile-{args.load}{args.label}-{role}.txt"
            spies.append(
                record(
                    table,
                    process,
                    args.seconds + 1,
                    outputs[role],
                    rate=args.rate,
                    native=args.native,
                )
            )
        time.sleep(0.5)  # py-spy attaches
        cpu_before = cpu_seconds(chain.pids)
        did = run_load(args.load, args.seconds, chain, target)
        cpu = cpu_seconds(chain.pids) - cpu_before
        for spy in spies:
            spy.popen.wait(args.seconds + 30)
        print(f"{args.load}: {did}; agent+server CPU {cpu:.2f} s")
        for role, out in outputs.items():
            if not out.exists():
                raise BenchError(f"py-spy wrote nothing for {role}: {table.tail(spies[0])}")
            print(f"\n== {role} ({out.name}) ==")
            print("\n".join(summarize(out, args.top)))
        return 0
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 1
    finally:
        table.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
