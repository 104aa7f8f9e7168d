"""The atheris harnesses, briefly: a fixed number of coverage-guided executions each, in make test.

``make fuzz-long`` runs the same harnesses for ten minutes each; docs/hardening.md has its figures.
Any exception other than the documented ones is a crash: libFuzzer exits non-zero and writes the
input to ``crash-*`` in the working directory (a temporary directory here; the path is printed).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fluidity.wire import frames

pytest.importorskip("atheris")

HERE = Path(__file__).parent
RUNS = 40_000

SEEDS = [
    # A HELLO, an OPEN, data with end-of-stream, a WINDOW, a PING, a FRAME_SIZE, a GOAWAY: a
    # head start towards the deep states (the fuzzer mutates from here).
    frames.encode(0, 0, 0, frames.hello_payload(1, 1024, 1024))
    + frames.encode(1, 0, 1, frames.open_payload("example.com", 443))
    + frames.encode(3, 1, 1, b"hello")
    + frames.encode(4, 0, 1, frames.window_payload(100))
    + frames.encode(6, 0, 0, b"12345678")
    + frames.encode(8, 0, 0, frames.frame_size_payload(16 * 1024))
    + frames.encode(7, 0, 0, frames.goaway_payload(1, frames.ErrorCode.GOING_AWAY, "bye")),
    b"\x01" * 64,
    b"\x00" * 64,
    # For the HTTP readers: pipelined requests with both body framings, and a response.
    b"\x01\x40\x05GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nPOST http://a/ HTTP/1.1\r\n"
    b"Content-Length: 2\r\n\r\nokPUT http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    b"\x00\x80\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil close",
]


@pytest.mark.parametrize("harness", ["fuzz_frames.py", "fuzz_session.py", "fuzz_http.py"])
def test_atheris_finds_no_crash_in_a_short_run(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(SEEDS):
        (corpus / f"seed-{index}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(HERE / harness), f"-runs={RUNS}", "-max_len=4096", "-seed=20261127",
         str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{harness} crashed (input saved in {tmp_path}):\n{output[-4000:]}"
    )
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done is not None and int(done.group(1)) >= RUNS, output[-2000:]
    coverage = re.findall(r"cov: (\d+)", output)
    print(f"{harness}: {done.group(1)} runs in {done.group(2)} s, coverage {coverage[-1:]}")
