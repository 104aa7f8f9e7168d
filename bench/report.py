"""The markdown report: environment, one table with ratios to the direct row, the goals."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.many import ManyResult

MiB = 1024 * 1024
MB = 1000 * 1000


@dataclass
class ChainResult:
    """Figures of one chain (None: not measured)."""

    name: str
    note: str = ""
    connect_mbps: float | None = None
    plain_mbps: float | None = None
    cpu_s_per_gb: float | None = None  # chain processes, bulk CONNECT downloads
    p50_ms: float | None = None  # concurrency 1, keep-alive
    p99_ms: float | None = None
    rate_c64: float | None = None  # requests/s, 64 keep-alive connections
    cpu_us_per_request: float | None = None  # chain processes, during the c64 run
    tunnels_per_s: float | None = None
    ttfb_ms: float | None = None
    peak_rss_mb: float | None = None
    problems: list[str] = field(default_factory=list)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _with_ratio(value: float | None, base: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if base is None or base == 0:
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} ({value / base:.2f}x)"


#: (heading, ChainResult attribute, decimals, whether to show the ratio to the direct row)
COLUMNS: list[tuple[str, str, int, bool]] = [
    ("CONNECT MB/s", "connect_mbps", 0, True),
    ("plain MB/s", "plain_mbps", 0, True),
    ("c1 p50 ms", "p50_ms", 3, True),
    ("c1 p99 ms", "p99_ms", 3, True),
    ("c64 req/s", "rate_c64", 0, True),
    ("tunnels/s", "tunnels_per_s", 0, True),
    ("TTFB ms", "ttfb_ms", 3, True),
    ("CPU s/GB", "cpu_s_per_gb", 2, False),
    ("CPU µs/req", "cpu_us_per_request", 0, False),
    ("peak RSS MiB", "peak_rss_mb", 1, False),
]


def table(results: list[ChainResult]) -> str:
    direct = next((r for r in results if r.name == "direct"), None)
    lines = [
        "| chain | " + " | ".join(heading for heading, *_ in COLUMNS) + " |",
        "|---|" + "--:|" * len(COLUMNS),
    ]
    for result in results:
        cells = [result.name]
        for _, attr, digits, ratio in COLUMNS:
            base = getattr(direct, attr) if ratio and direct is not None else None
            cells.append(_with_ratio(getattr(result, attr), base, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: list[ChainResult], many: ManyResult | None) -> list[str]:
    """One line per goal of issue #3: met or not, with the figures."""
    by_name = {r.name: r for r in results}
    fl = by_name.get("fluidity")
    if fl is None:
        return ["(fluidity not measured)"]
    lines = []

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"- **{mark}**: {text}")

    direct = by_name.get("direct")
    # Fluidity on asyncio's loop is Fluidity too, not a competitor.
    others = [r for r in results if r.name != "direct" and not r.name.startswith("fluidity")]
    if fl.connect_mbps and direct and direct.connect_mbps:
        ratio = fl.connect_mbps / direct.connect_mbps
        best = max(others, key=lambda r: r.connect_mbps or 0, default=None)
        beats = all((r.connect_mbps or 0) < fl.connect_mbps for r in others)
        best_text = f"; best other: {best.name} {best.connect_mbps:.0f} MB/s" if best else ""
        line(
            ratio >= 0.30 and beats,
            f"CONNECT bulk ≥ 0.30 x direct and above every other chain: {ratio:.2f}x "
            f"({fl.connect_mbps:.0f} MB/s){best_text}",
        )
    pp = by_name.get("pproxy")
    if fl.rate_c64 and pp and pp.rate_c64:
        ratio = fl.rate_c64 / pp.rate_c64
        line(ratio >= 1.5, f"c64 keep-alive rate ≥ 1.5 x pproxy: {ratio:.2f}x "
             f"({fl.rate_c64:,.0f} vs {pp.rate_c64:,.0f} req/s)")  # fmt: skip
    if fl.p50_ms is not None:
        line(fl.p50_ms <= 0.30, f"c1 p50 ≤ 0.30 ms: {fl.p50_ms:.3f} ms")
    stunnels = [r for r in results if r.name.startswith("stunnel") and r.tunnels_per_s]
    if fl.tunnels_per_s and stunnels:
        best = max(stunnels, key=lambda r: r.tunnels_per_s or 0)
        assert best.tunnels_per_s is not None
        ratio = fl.tunnels_per_s / best.tunnels_per_s
        line(ratio >= 5, f"new tunnels/s ≥ 5 x the stunnel chain ({best.name}): {ratio:.2f}x "
             f"({fl.tunnels_per_s:,.0f} vs {best.tunnels_per_s:,.0f}/s)")  # fmt: skip
    if fl.cpu_s_per_gb is not None:
        line(fl.cpu_s_per_gb <= 4, f"CPU ≤ 4 s/GB: {fl.cpu_s_per_gb:.2f} s/GB")
    if fl.cpu_us_per_request is not None:
        line(fl.cpu_us_per_request <= 150, f"CPU ≤ 150 µs/request: {fl.cpu_us_per_request:.0f} µs")
    if many is not None:
        # The goal is in decimal megabytes; the figures are printed in MiB, as ps and top show.
        ok = many.used == many.wanted and many.peak_rss <= 200 * MB
        line(
            ok,
            f"{many.wanted:,} concurrent tunnels all usable, agent+server RSS ≤ 200 MB: "
            f"{many.opened:,} opened in {many.open_seconds:.1f} s, {many.used:,} used after the "
            f"hold; RSS {many.rss_held / MiB:.1f} MiB held, {many.rss_after / MiB:.1f} MiB after "
            f"use, peak (VmHWM) {many.peak_rss / MiB:.1f} MiB = {many.peak_rss / MB:.1f} MB",
        )
    return lines


def _version(argv: list[str], pattern: str = r"\d+(\.\d+)+\S*") -> str:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(0) if match else "?"


def _py_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


RESULTS = Path(__file__).resolve().parent / "results"
"""Where reports are written (git-ignored)."""


def publish(report: str, filename: str, *, save: bool) -> None:
    """Print ``report``; with ``save``, also write it to ``bench/results/<filename>``."""
    print(report)
    if save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / filename
        path.write_text(report)
        print(f"\nwritten to {path}", file=sys.stderr)


def environment() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = {
        "python": platform.python_version(),
        "fluidity": _py_version("fluidity"),
        "uvloop": _py_version("uvloop"),
        "pproxy": _py_version("pproxy"),
        "nginx": _version(["nginx", "-v"]),
        "tinyproxy": _version(["tinyproxy", "-v"]),
        "squid": _version(["squid", "-v"]),
        "stunnel": _version(["stunnel4", "-version"]),
        "openssh": _version(["ssh", "-V"], r"OpenSSH_\S+"),
        "openssl": _version([sys.executable, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"]),
        "curl": _version(["curl", "--version"]),
        "wrk": _version(["wrk", "-v"], r"\d+\.\d+\.\d+"),
    }
    return [
        f"- machine: {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
