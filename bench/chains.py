"""The chains compared: each is a set of processes with an HTTP proxy port at its front.

Every chain gets its own processes (no sharing), so the CPU time and peak memory of a chain are
those of its own processes. Configuration files are written into the run's temporary directory.
All TLS chains use the same certificates (ECDSA P-256, made by ``fluidity.certs``).
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, ProcessTable, Started, free_port, wait_listening
from fluidity.certs import PkiPaths

READY_TIMEOUT = 15.0  # seconds a chain has to start listening


@dataclass
class Chain:
    """A way to reach the target. ``proxy_port`` is None for the direct row (no proxy)."""

    name: str
    proxy_port: int | None
    processes: list[Started] = field(default_factory=list)
    note: str = ""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def no_hop(name: str, port: int) -> int:
    """The port a chain's client half dials to reach its server half's ``port``: that port."""
    return port


@dataclass(frozen=True)
class Context:
    """What every chain builder needs.

    ``hop(name, port)``: the port a chain's client half dials to reach ``port`` on its server
    half, the hop that crosses the network in a real deployment (``bench.longpath`` puts a
    delay relay there).
    """

    table: ProcessTable
    root: Path
    pki: PkiPaths
    python: str = sys.executable
    hop: Callable[[str, int], int] = no_hop


def _dir(ctx: Context, name: str, mode: int = 0o755) -> Path:
    path = ctx.root / name
    path.mkdir()
    os.chmod(path, mode)
    return path


# --- forward proxies ------------------------------------------------------------------------------


def tinyproxy(ctx: Context, name: str = "tinyproxy") -> Chain:
    work = _dir(ctx, name, 0o777)  # tinyproxy may drop to "nobody" and must write its log
    port = free_port()
    conf = work / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 2048\nAllow 127.0.0.1\n"
        f'LogFile "{work}/tinyproxy.log"\nLogLevel Error\nDisableViaHeader Yes\n'
        # No ConnectPort line: CONNECT is allowed to any port (the target is not on 443).
    )
    proc = ctx.table.start(name, ["tinyproxy", "-d", "-c", str(conf)])
    wait_listening(port, [proc], ctx.table, READY_TIMEOUT)
    return Chain(name, port, [proc], "tinyproxy 1 process (threads)")


SQUID_CONF = """\
# Written by the Fluidity benchmark harness: no cache, no access log, one process (-N).
http_port 127.0.0.1:{port}
acl bench src 127.0.0.1/32
http_access allow bench
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log {work}/cache.log
pid_filename {work}/squid.pid
coredump_dir {work}
netdb_filename none
pinger_enable off
logfile_rotate 0
shutdown_lifetime 1 seconds
max_filedescriptors 16384
via off
forwarded_for delete
httpd_suppress_version_string on
"""


def squid(ctx: Context, name: str = "squid") -> Chain:
    work = _dir(ctx, name, 0o777)  # squid drops to its effective user ("proxy") and writes here
    port = free_port()
    conf = work / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, work=work))
    proc = ctx.table.start(name, ["squid", "-N", "-f", str(conf)])
    wait_listening(port, [proc], ctx.table, READY_TIMEOUT)
    return Chain(name, port, [proc], "squid -N (1 process, no cache)")


# --- TLS and SSH transports in front of a proxy ---------------------------------------------------


def stunnel(ctx: Context, backend: Chain, name: str) -> Chain:
    """stunnel client -> stunnel server (TLS 1.3, mutual certificates) -> ``backend``'s proxy."""
    work = _dir(ctx, name)
    pki = ctx.pki
    server_port, client_port = free_port(), free_port()
    common = (
        "foreground = yes\npid =\ndebug = err\n"
        # Both ends of every TCP hop without Nagle, as a tuned deployment would run it.
        "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
    )
    server_conf = work / "server.conf"
    server_conf.write_text(
        f"{common}output = {work}/server.log\n[tls]\naccept = 127.0.0.1:{server_port}\n"
        f"connect = 127.0.0.1:{backend.proxy_port}\ncert = {pki.server_cert}\n"
        f"key = {pki.server_key}\nCAfile = {pki.ca_cert}\nverifyChain = yes\n"
        "requireCert = yes\nsslVersionMin = TLSv1.3\n"
    )
    client_conf = work / "client.conf"
    client_conf.write_text(
        f"{common}output = {work}/client.log\n[tls]\nclient = yes\n"
        f"accept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{ctx.hop(name, server_port)}\n"
        f"cert = {pki.client_cert}\nkey = {pki.client_key}\nCAfile = {pki.ca_cert}\n"
        "verifyChain = yes\ncheckHost = fluidity-server\nsslVersionMin = TLSv1.3\n"
    )
    server = ctx.table.start(f"{name}-server", ["stunnel4", str(server_conf)])
    client = ctx.table.start(f"{name}-client", ["stunnel4", str(client_conf)])
    wait_listening(server_port, [server], ctx.table, READY_TIMEOUT)
    wait_listening(client_port, [client], ctx.table, READY_TIMEOUT)
    return Chain(
        name, client_port, [client, server, *backend.processes], "stunnel pair + " + backend.name
    )


SSHD_CONF = """\
# Written by the Fluidity benchmark harness: key-only sshd on loopback for `ssh -L`.
Port {port}
ListenAddress 127.0.0.1
HostKey {work}/host_key
PidFile none
AuthorizedKeysFile {work}/authorized_keys
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
StrictModes no
UsePAM no
PrintMotd no
PrintLastLog no
LogLevel ERROR
"""

#: How the SSH client is run. ``ssh -N`` opens no session, so neither end marks the connection
#: interactive and OpenSSH leaves Nagle's algorithm on: small request/response exchanges then wait
#: for delayed ACKs (tens of ms). Asking for a terminal and running a long sleep makes both ends
#: set TCP_NODELAY on the SSH connection (an interactive session), which is what a user who tunes
#: it would do; ``IPQoS=throughput`` keeps the bulk marking, which is meaningless on loopback.
SSH_HOLD_SECONDS = 86400


def ssh(ctx: Context, backend: Chain, name: str = "ssh+squid") -> Chain:
    """``ssh -L`` through a local sshd (generated host and user keys) to ``backend``'s proxy."""
    work = _dir(ctx, name, 0o700)
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    (work / "authorized_keys").write_text((work / "user_key.pub").read_text())
    port, local_port = free_port(), free_port()
    conf = work / "sshd_config"
    conf.write_text(SSHD_CONF.format(port=port, work=work, user=getpass.getuser()))
    # sshd insists on its privilege-separation directory (compiled in); create it if missing.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd = ctx.table.start(f"{name}-sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)])
    wait_listening(port, [sshd], ctx.table, READY_TIMEOUT)
    client = ctx.table.start(
        f"{name}-client",
        [
            "ssh", "-F", "/dev/null", "-tt", "-p", str(ctx.hop(name, port)),
            "-i", str(work / "user_key"),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
            "-o", "IPQoS=throughput", "-o", "LogLevel=ERROR",
            "-L", f"127.0.0.1:{local_port}:127.0.0.1:{backend.proxy_port}",
            f"{getpass.getuser()}@127.0.0.1", f"sleep {SSH_HOLD_SECONDS}",
        ],
    )  # fmt: skip
    wait_listening(local_port, [client, sshd], ctx.table, READY_TIMEOUT)
    return Chain(
        name,
        local_port,
        [client, sshd, *backend.processes],
        "ssh -tt -L (TCP_NODELAY via a tty session) + " + backend.name,
    )


def pproxy(ctx: Context, name: str = "pproxy") -> Chain:
    """pproxy client (HTTP proxy) -> pproxy server over TLS (server-authenticated only)."""
    pki = ctx.pki
    server_port, client_port = free_port(), free_port()
    server = ctx.table.start(
        f"{name}-server",
        [
            ctx.python, "-m", "bench.run_pproxy", "-l", f"http+ssl://127.0.0.1:{server_port}",
            "--ssl", f"{pki.server_cert},{pki.server_key}",
        ],
    )  # fmt: skip
    wait_listening(server_port, [server], ctx.table, READY_TIMEOUT)
    client = ctx.table.start(
        f"{name}-client",
        [
            ctx.python, "-m", "bench.run_pproxy", "-l", f"http://127.0.0.1:{client_port}",
            "-r", f"http+ssl://127.0.0.1:{ctx.hop(name, server_port)}",
        ],
    )  # fmt: skip
    wait_listening(client_port, [client], ctx.table, READY_TIMEOUT)
    return Chain(name, client_port, [client, server], "pproxy (uvloop) client -> server, TLS")


# --- Fluidity -------------------------------------------------------------------------------------

FLUIDITY_SERVER = """\
# Written by the Fluidity benchmark harness.
listen_addr: "127.0.0.1"
listen_port: {port}
cert_file: "{pki.server_cert}"
key_file: "{pki.server_key}"
ca_cert_file: "{pki.ca_cert}"
log_level: "warning"
# The 10,000-tunnel test holds that many streams on one link (default limit: 1024).
max_streams_per_connection: 16384
egress:
  allow_cidrs: ["127.0.0.0/8"]
"""

FLUIDITY_AGENT = """\
# Written by the Fluidity benchmark harness.
server_ip: "127.0.0.1"
server_port: {server_port}
local_proxy_port: {proxy_port}
cert_file: "{pki.client_cert}"
key_file: "{pki.client_key}"
ca_cert_file: "{pki.ca_cert}"
log_level: "warning"
"""


def fluidity(
    ctx: Context,
    name: str = "fluidity",
    module: str = "fluidity",
    source: Path | None = None,
    *,
    extra_config: str = "",
) -> Chain:
    """``python -m fluidity server`` and ``agent`` with configs written here.

    ``module`` may be ``bench.fluidity_asyncio``: the same commands on asyncio's own loop.
    ``source``: a checkout of another commit, whose ``src`` is imported instead of this one's.
    ``extra_config``: YAML lines added to both configs (keys both roles have, at the top level
    of the server's and under ``tunnel:`` in the agent's).
    """
    work = _dir(ctx, name)
    server_port, proxy_port = free_port(), free_port()
    server_yaml = FLUIDITY_SERVER.format(port=server_port, pki=ctx.pki) + extra_config
    agent_yaml = FLUIDITY_AGENT.format(
        server_port=ctx.hop(name, server_port), proxy_port=proxy_port, pki=ctx.pki
    )
    if extra_config:
        agent_yaml += "tunnel:\n" + "".join(f"  {line}\n" for line in extra_config.splitlines())
    (work / "server.yaml").write_text(server_yaml)
    (work / "agent.yaml").write_text(agent_yaml)
    env = dict(os.environ)
    env.pop("FLUIDITY_LOG_LEVEL", None)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(source / "src"), env.get("PYTHONPATH")])
        )
    server = ctx.table.start(
        f"{name}-server",
        [ctx.python, "-m", module, "server", "--config", str(work / "server.yaml")],
        env=env,
    )
    wait_listening(server_port, [server], ctx.table, READY_TIMEOUT)
    agent = ctx.table.start(
        f"{name}-agent",
        [ctx.python, "-m", module, "agent", "--config", str(work / "agent.yaml")],
        env=env,
    )
    wait_listening(proxy_port, [agent, server], ctx.table, READY_TIMEOUT)
    loop = "asyncio loop" if module != "fluidity" else "uvloop, as the CLI runs"
    note = f"fluidity agent -> server (mTLS 1.3, {loop})"
    if source is not None:
        note += f", the code in {source}"
    return Chain(name, proxy_port, [agent, server], note)


def baseline_source(directory: Path) -> Path:
    """Check that ``directory`` is a Fluidity checkout (``git worktree add DIR COMMIT``)."""
    if not (directory / "src" / "fluidity" / "__main__.py").is_file():
        raise BenchError(
            f"--baseline {directory}: no src/fluidity/__main__.py there; make a checkout of the "
            "commit to compare with, e.g. `git worktree add /tmp/base HEAD~1`"
        )
    return directory.resolve()


Builder = Callable[[Context], list[Chain]]


def build_all(ctx: Context, names: list[str], baseline: Path | None = None) -> list[Chain]:
    """Start the chains named in ``names`` (see :data:`CHAIN_NAMES`), in that order.

    With ``baseline`` (a checkout of another commit), ``fluidity-baseline`` runs that code right
    after ``fluidity``, so the two are measured in the same rounds.
    """
    unknown = [n for n in names if n not in CHAIN_NAMES]
    if unknown:
        raise BenchError(f"unknown chain(s) {unknown}; choose from {', '.join(CHAIN_NAMES)}")
    chains: list[Chain] = []
    for chain_name in names:
        if chain_name == "direct":
            chains.append(Chain("direct", None, [], "no proxy: the limit"))
        elif chain_name == "tinyproxy":
            chains.append(tinyproxy(ctx))
        elif chain_name == "squid":
            chains.append(squid(ctx))
        elif chain_name == "stunnel+tinyproxy":
            chains.append(stunnel(ctx, tinyproxy(ctx, "tinyproxy-b"), chain_name))
        elif chain_name == "stunnel+squid":
            chains.append(stunnel(ctx, squid(ctx, "squid-b"), chain_name))
        elif chain_name == "ssh+squid":
            chains.append(ssh(ctx, squid(ctx, "squid-c")))
        elif chain_name == "pproxy":
            chains.append(pproxy(ctx))
        elif chain_name == "fluidity":
            chains.append(fluidity(ctx))
            if baseline is not None:
                chains.append(fluidity(ctx, "fluidity-baseline", source=baseline))
        elif chain_name == "fluidity-asyncio":
            chains.append(fluidity(ctx, chain_name, "bench.fluidity_asyncio"))
    return chains


CHAIN_NAMES = (
    "direct",
    "tinyproxy",
    "squid",
    "stunnel+tinyproxy",
    "stunnel+squid",
    "ssh+squid",
    "pproxy",
    "fluidity",
    "fluidity-asyncio",
)

#: The Debian commands each chain needs (to say what is missing instead of failing obscurely).
REQUIRED_COMMANDS = {
    "direct": ["nginx"],
    "tinyproxy": ["tinyproxy"],
    "squid": ["squid"],
    "stunnel+tinyproxy": ["stunnel4", "tinyproxy"],
    "stunnel+squid": ["stunnel4", "squid"],
    "ssh+squid": ["ssh", "ssh-keygen", "/usr/sbin/sshd", "squid"],
    "pproxy": [],
    "fluidity": [],
    "fluidity-asyncio": [],
}
