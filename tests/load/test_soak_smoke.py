"""The soak script itself, briefly (seconds, not minutes), so that ``make soak`` does not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .soak import slope_per_minute

ROOT = Path(__file__).resolve().parents[2]


def test_slope_is_the_least_squares_trend_per_minute() -> None:
    assert slope_per_minute([(0, 100), (60, 110), (120, 120)]) == 10
    assert slope_per_minute([(0, 5), (30, 5)]) == 0
    assert slope_per_minute([(0, 5)]) == 0


def test_soak_runs_mixed_traffic_briefly_without_errors(tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.load.soak", "--seconds", "6", "--interval", "2",
         "--warmup", "2", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["errors"] == {}
    assert all(report["ops"].get(kind, 0) > 0 for kind in ("bulk", "small", "websocket", "tunnel"))
    expected = {f"{p}_{m}_per_min" for p in ("agent", "server") for m in ("rss_kib", "fds")}
    assert len(report["samples"]) >= 3 and set(report["slopes"]) == expected
    assert "slopes after warm-up" in result.stdout
