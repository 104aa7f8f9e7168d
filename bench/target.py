"""The target every chain reaches: nginx with its own config, serving three generated objects."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.procs import ProcessTable, Started, free_port, wait_listening

SMALL_SIZE = 100  # bytes: the small-request object
MEDIUM_SIZE = 1 << 20  # 1 MiB
BULK_SIZE = 512 << 20  # 512 MiB: the bulk-download object

NGINX_CONF = """\
# Written by the Fluidity benchmark harness: one worker, sendfile, no access log.
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log error;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
    }}
}}
"""


@dataclass(frozen=True)
class Target:
    """nginx on 127.0.0.1:``port``; ``digests`` maps a path (``/small``) to its sha256."""

    port: int
    process: Started
    sizes: dict[str, int]
    digests: dict[str, str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"


def _write_object(path: Path, size: int) -> str:
    """Write ``size`` incompressible bytes, different in every MiB; return their sha256."""
    block = hashlib.sha256(b"fluidity-bench").digest() * 32768  # 1 MiB
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        counter = 0
        while left:
            # Vary each MiB so a swapped or repeated block would not go unnoticed.
            chunk = (counter.to_bytes(8, "big") + block)[: min(left, len(block))]
            out.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            counter += 1
    return digest.hexdigest()


def start_target(
    table: ProcessTable,
    root: Path,
    *,
    bulk: bool,
    connections: int,
    extra: Mapping[str, int] | None = None,
) -> Target:
    """Generate the objects (the 512 MiB one only if ``bulk``) and start nginx on a free port.

    ``extra``: more objects to serve, path to size in bytes (``{"/long": 64 << 20}``).
    """
    www = root / "www"
    www.mkdir()
    sizes = {"/small": SMALL_SIZE, "/medium": MEDIUM_SIZE}
    if bulk:
        sizes["/bulk"] = BULK_SIZE
    sizes.update(extra or {})
    digests = {path: _write_object(www / path[1:], size) for path, size in sizes.items()}
    # nginx workers may run as "nobody": everything they read must be world-readable.
    for item in (root, www, *www.iterdir()):
        os.chmod(item, 0o755 if item.is_dir() else 0o644)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            root=root, www=www, port=port, connections=connections, nofile=2 * connections + 64
        )
    )
    process = table.start(
        "nginx", ["nginx", "-p", str(root), "-e", str(root / "nginx-error.log"), "-c", str(conf)]
    )
    wait_listening(port, [process], table, timeout=10)
    return Target(port, process, sizes, digests)
