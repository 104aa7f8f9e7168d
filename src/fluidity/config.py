"""Typed configuration for every role: YAML files, ``${ENV}`` substitution, environment, flags.

Precedence, lowest to highest: model defaults, the YAML file, ``FLUIDITY_*`` environment variables,
command-line flags. Inside the file, string values may use ``${VAR}`` or ``${VAR:-default}``.
Environment overrides use the key path in capitals with ``__`` between levels:
``FLUIDITY_LOG_LEVEL=debug``, ``FLUIDITY_TUNNEL__RECONNECT_MAX=1m``.

Durations are written ``"250ms"``, ``"90s"``, ``"5m"``, ``"1h"`` (a bare number means seconds);
sizes ``"256KiB"``, ``"1MiB"``, ``"64KB"`` (a bare number means bytes). The field descriptions
of the models below are the configuration reference (``fluidity config reference`` prints it).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    ValidationError,
    field_validator,
)

from fluidity.errors import ConfigError
from fluidity.wire.frames import MAX_FRAME_PAYLOAD, MAX_WINDOW
from fluidity.wire.session import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_STREAM_WINDOW,
    DEFAULT_STREAM_WINDOW,
    DEFAULT_WINDOW_GROWTH_BUDGET,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_PREFIX = "FLUIDITY_"


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s' or '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like '30s', '5m' or '250ms', got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``"256KiB"``, ``"1MiB"``, ``"64KB"`` or an integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '256KiB'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like '256KiB' or '1MiB', got {value!r}")
        unit = (match.group(2) or "B").lower()
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def _size_between(low: int, high: int, what: str) -> AfterValidator:
    """A check that a size is ``low`` to ``high`` bytes; ``what`` names it and the range."""

    def check(size: int) -> int:
        if not low <= size <= high:
            raise ValueError(f"{what}, got {size} bytes")
        return size

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
WindowSize = Annotated[
    Size, _size_between(1024, MAX_WINDOW, "a stream window must be 1 KiB to 2 GiB")
]
MaxWindowSize = Annotated[
    Size, _size_between(0, MAX_WINDOW, "a window limit must be 0 (no growth) to 2 GiB")
]
FrameSize = Annotated[
    Size, _size_between(1024, MAX_FRAME_PAYLOAD, "a frame size must be 1 KiB to 1 MiB")
]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


class EgressConfig(_Model):
    """Which targets the server may dial (checked on the resolved address: DNS cannot bypass it)."""

    default_deny_ranges: bool = True
    """Deny loopback, private, link-local (incl. 169.254.169.254, 169.254.170.2), CGNAT,
    multicast, reserved and unspecified addresses unless ``allow_cidrs`` re-allows them."""
    allow_cidrs: list[str] = []
    """CIDRs allowed even inside a default-denied range, e.g. ``127.0.0.0/8`` for local tests."""
    deny_cidrs: list[str] = []
    """Extra CIDRs to deny; wins over ``allow_cidrs``."""
    allow_hosts: list[str] = []
    """If not empty, only these names may be dialled (exact; ``*.example.com`` or ``.example.com``
    match the domain and every name under it). Never bypasses the address checks."""
    deny_hosts: list[str] = []
    """Host names never dialled (same patterns as ``allow_hosts``)."""
    allow_ports: list[str] = []
    """If not empty, only these ports or ranges (``"443"``, ``"8000-8999"``)."""
    deny_ports: list[str] = []
    """Ports or ranges never dialled."""


class ServerConfig(_Model):
    """``fluidity server``: accepts agents over mutual TLS and dials their targets."""

    listen_addr: str = "0.0.0.0"  # the server's job is to be reachable
    """Address to listen on for agent links."""
    listen_port: int = 8443
    """TCP port for agent links."""
    cert_file: Path = Path("certs/server.crt")
    """Server certificate (PEM), issued by ``fluidity certs init``."""
    key_file: Path = Path("certs/server.key")
    """Server private key (PEM)."""
    ca_cert_file: Path = Path("certs/ca.crt")
    """CA that signs agent certificates; agents must present a certificate it issued."""
    cert_source: Literal["file", "env", "secretsmanager"] = "file"
    """Where the server certificate, key and CA come from: ``file`` (the three paths above),
    ``env`` (PEM or base64 in ``FLUIDITY_SERVER_CERT_PEM``, ``FLUIDITY_SERVER_KEY_PEM``,
    ``FLUIDITY_CA_CERT_PEM``) or ``secretsmanager`` (the JSON secret ``cert_secret_name`` with
    fields ``server_cert``, ``server_key``, ``ca_cert``; needs ``pip install 'fluidity[aws]'``)."""
    cert_secret_name: str = "fluidity/certificates"
    """AWS Secrets Manager secret read when ``cert_source`` is ``secretsmanager`` (name or ARN;
    region and credentials from the AWS environment). ``fluidity cloud certs push`` writes it."""
    crl_file: Path | None = None
    """Certificate revocation list (PEM, signed by the CA) written by ``fluidity certs revoke``;
    an agent whose certificate it lists is refused right after the handshake, with a log line
    naming it. Missing file: a warning, and it is loaded when it appears."""
    tls_reload_interval: Duration = 30.0
    """How often the server checks whether the certificate, key, CA (``cert_source: file``) or
    CRL files changed, and reloads them (0 = only on SIGHUP, which always reloads). New
    connections use the new material; open links continue, except those of revoked agents."""
    health_port: int = 0
    """Port of the health endpoint on 127.0.0.1 only (0 = off): HTTP 200 while the listener
    accepts, 503 while draining; ``fluidity server healthcheck`` asks it (the Docker image uses
    8444)."""
    max_connections: int = 64
    """Agent links accepted at once; more are refused at the TLS layer with a log line."""
    max_streams_per_connection: int = 1024
    """Streams open at once on one link; further opens get the LIMIT code (agent answers 503)."""
    dial_timeout: Duration = 10.0
    """Time to resolve and connect a target before answering TIMEOUT."""
    handshake_timeout: Duration = 10.0
    """Time a new connection has to complete TLS and send HELLO."""
    stream_window: WindowSize = DEFAULT_STREAM_WINDOW
    """Flow-control window a stream starts with: the most bytes in flight towards this side per
    stream until it grows (``max_stream_window``). Throughput per stream is at most window /
    round trip; worst-case memory is this times the busy streams, plus
    ``stream_window_budget``. On a path of 5 ms or more a window that only queues bytes on
    the path is cut below it (to no less than 64 KiB)."""
    max_stream_window: MaxWindowSize = DEFAULT_MAX_STREAM_WINDOW
    """Largest window an upload stream grows to when the window, not the path, limits it
    (measured with PINGs each round trip; see docs/protocol.md). At or below ``stream_window``,
    windows stay fixed."""
    stream_window_budget: Size = DEFAULT_WINDOW_GROWTH_BUDGET
    """Bytes all streams of one link may grow their windows by together, beyond
    ``stream_window`` (0 = no growth); returned as streams end or their windows shrink."""
    max_frame_size: FrameSize = DEFAULT_MAX_FRAME_SIZE
    """Largest DATA frame payload this side accepts; smaller interleaves streams finely, larger
    costs less CPU. On a slow path of 5 ms or more this side asks the peer for frames that
    cross it in 10 ms (a FRAME_SIZE frame; docs/protocol.md), never above this."""
    stream_buffer: Size = 256 * 1024
    """Bytes read from a target and queued for the link before reading pauses."""
    keepalive_interval: Duration = 15.0
    """Seconds between PINGs on an idle link."""
    keepalive_timeout: Duration = 30.0
    """A link silent this long is dead (well under the 60 s idle cut of AWS load balancers)."""
    shutdown_grace: Duration = 10.0
    """On SIGTERM/SIGINT: time open streams get to finish after GOAWAY before being closed."""
    egress: EgressConfig = EgressConfig()
    """Egress policy (see the egress section)."""
    emit_metrics: bool = False
    """Publish activity metrics to CloudWatch (what the sleep Lambda reads); needs
    ``pip install 'fluidity[aws]'`` and ``cloudwatch:PutMetricData``. Failures are logged and
    retried with backoff; they never block or stop the server."""
    metrics_interval: Duration = 60.0
    """Seconds between CloudWatch publishes (at least 1)."""
    metrics_namespace: str = "Fluidity"
    """CloudWatch namespace of the metrics (the Lambdas' ``METRIC_NAMESPACE``)."""
    cluster_name: str = "fluidity"
    """Value of the ``ClusterName`` metric dimension (``FLUIDITY_CLUSTER_NAME``, set by the task
    definition); must match the Lambdas' ``CLUSTER_NAME``."""
    service_name: str = "fluidity-server"
    """Value of the ``ServiceName`` metric dimension (``FLUIDITY_SERVICE_NAME``); must match the
    Lambdas' ``SERVICE_NAME``."""
    admin_addr: str = "127.0.0.1"
    """Address of the admin endpoint (``GET /metrics`` for Prometheus, ``GET /status`` JSON)."""
    admin_port: int = 0
    """Port of the admin endpoint (0 = off). The local control backend turns it on."""
    log_level: LogLevel = "info"
    """debug, info, warning or error (also ``FLUIDITY_LOG_LEVEL``)."""
    log_format: LogFormat = "text"
    """``text`` (key=value lines) or ``json`` (one object a line, for CloudWatch Logs Insights)."""


class TunnelConfig(_Model):
    """The agent's link to the server: reconnects, waits and flow control."""

    connections: int = 1
    """Links kept open to the server (a small pool spreads load over several TLS sessions)."""
    connect_timeout: Duration = 10.0
    """Time for TCP connect plus TLS handshake plus the server's HELLO."""
    reconnect_initial: Duration = 0.5
    """First delay before reconnecting after a failure."""
    reconnect_max: Duration = 30.0
    """Longest delay between reconnect attempts."""
    reconnect_multiplier: float = 2.0
    """Factor applied to the delay after each failed attempt."""
    reconnect_jitter: float = 0.2
    """Random fraction (0-1) added or removed from each delay so agents do not reconnect in step."""
    reconnect_max_attempts: int = 0
    """Give up after this many consecutive failures (0 = retry forever)."""
    link_wait_timeout: Duration = 10.0
    """While no link is up, how long a new client request waits before getting 503."""
    open_timeout: Duration = 30.0
    """Time to wait for the server's answer to a stream open before answering 504."""
    keepalive_interval: Duration = 15.0
    """Seconds between PINGs."""
    keepalive_timeout: Duration = 30.0
    """A link silent this long is declared dead; its streams fail and the agent reconnects."""
    stream_window: WindowSize = DEFAULT_STREAM_WINDOW
    """Flow-control window a stream starts with: bytes the server may send before the agent
    returns credit, until the window grows (``max_stream_window``). Throughput per stream is at
    most window / round trip; worst-case memory is this times the busy streams, plus
    ``stream_window_budget``."""
    max_stream_window: MaxWindowSize = DEFAULT_MAX_STREAM_WINDOW
    """Largest window a download stream grows to when the window, not the path, limits it
    (measured with PINGs each round trip; see docs/protocol.md). At or below ``stream_window``,
    windows stay fixed."""
    stream_window_budget: Size = DEFAULT_WINDOW_GROWTH_BUDGET
    """Bytes all streams of one link may grow their windows by together, beyond
    ``stream_window`` (0 = no growth); returned as streams end or their windows shrink."""
    max_frame_size: FrameSize = DEFAULT_MAX_FRAME_SIZE
    """Largest DATA frame payload this side accepts; smaller interleaves streams finely, larger
    costs less CPU. On a slow path of 5 ms or more this side asks the peer for frames that
    cross it in 10 ms (a FRAME_SIZE frame; docs/protocol.md), never above this."""
    stream_buffer: Size = 256 * 1024
    """Bytes queued per stream for the link before the writer waits (backpressure)."""


class HttpConfig(_Model):
    """Limits of the agent's HTTP proxy front end."""

    max_header_bytes: Size = 64 * 1024
    """Largest request head (request line and headers); larger gets 431. Also bounds the
    upstream proxy's answers to CONNECT (head, and the error page after it)."""
    max_request_line: Size = 8 * 1024
    """Longest request line; longer gets 414."""
    max_headers: int = 100
    """Most header fields in a request; more gets 431."""
    header_read_timeout: Duration = 30.0
    """Time a client has to send a complete request head (slowloris protection)."""
    idle_timeout: Duration = 120.0
    """Keep-alive client connections idle this long are closed."""
    read_chunk: Size = 256 * 1024
    """Bytes read from a client socket at a time."""
    max_connections: int = 0
    """Client connections served at once; more are answered 503 (with ``Retry-After``) and
    closed. 0 = derived from the open-file limit (``ulimit -n``) minus the descriptors in use
    minus 32, so the agent answers instead of running out of file descriptors."""


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


OptionalText = Annotated[str | None, BeforeValidator(_empty_is_none)]


class LifecycleConfig(_Model):
    """The agent's side of the control plane: wake the server on start, release it on exit."""

    enabled: bool = False
    """Call the control API: wake on start (and when a request finds the server asleep), poll
    status for the server's address, release on exit."""
    wake_api_endpoint: OptionalText = None
    """URL of ``POST /wake`` (API Gateway stage URL + ``/wake``, or the local control API)."""
    kill_api_endpoint: OptionalText = None
    """URL of ``POST /kill``; the agent sends a release there on exit (see ``on_exit``)."""
    status_api_endpoint: OptionalText = None
    """URL of ``GET /status``; unset: ``wake_api_endpoint`` with its last ``/wake`` made
    ``/status``."""
    api_key: OptionalText = None
    """Sent as ``x-api-key`` (write ``"${LAMBDA_API_KEY}"`` to keep it out of the file)."""
    connection_timeout: Duration = 90.0
    """How long a wake may take (control API, server start, first link) before it is reported
    as failed; the agent keeps retrying after that at ``tunnel.reconnect_max`` pace."""
    connection_retry_interval: Duration = 5.0
    """Longest pause between control-API retries, status polls and link attempts while waking
    (they start at a quarter second and double up to this)."""
    connection_max_retries: int = 20
    """Control-API calls tried per wake before giving up until the next request."""
    request_timeout: Duration = 10.0
    """Time limit of one control-API call."""
    on_exit: Literal["release", "kill", "none"] = "release"
    """On exit: ``release`` (stop the server unless another agent is active), ``kill`` (stop
    it) or ``none``."""


class ProxyUser(_Model):
    """A user allowed to use the agent's proxy (HTTP Basic and SOCKS5 username/password)."""

    username: str
    """1-255 bytes, no ``:`` (Basic puts it before the password)."""
    password: SecretStr
    """1-255 bytes; write ``"${PROXY_PASSWORD}"`` to keep it out of the file."""

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not 1 <= len(value.encode()) <= 255 or ":" in value:
            raise ValueError("a user name has 1 to 255 bytes and no ':'")
        return value

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr) -> SecretStr:
        if not 1 <= len(value.get_secret_value().encode()) <= 255:
            raise ValueError("a password has 1 to 255 bytes (the SOCKS5 limit)")
        return value


class ProxyAuthConfig(_Model):
    """Who may use the agent's proxy (needed to listen on a non-loopback address)."""

    users: list[ProxyUser] = []
    """Entries ``{username: ..., password: ...}``. When not empty, every client must log in, on
    loopback too: HTTP with ``Proxy-Authorization: Basic`` (407 otherwise), SOCKS5 with
    username/password (RFC 1929). Checked in constant time. Basic sends the password in clear
    on the LAN."""
    realm: str = "fluidity"
    """Realm named in the 407 challenge (browsers show it in the login prompt)."""


class SocksConfig(_Model):
    """SOCKS5 (RFC 1928) on the agent: CONNECT with domain, IPv4 and IPv6 addresses."""

    enabled: bool = True
    """Accept SOCKS5 on ``local_proxy_port`` (a first byte 0x05 tells it from HTTP) and on
    ``socks_port`` if set."""
    handshake_timeout: Duration = 10.0
    """Time a SOCKS5 client has for greeting, login and request together."""


class PacConfig(_Model):
    """``GET /proxy.pac`` on the proxy port: a PAC file that sends browsers to the agent."""

    enabled: bool = True
    """Serve the PAC file (to anyone who can reach the port: browsers fetch it without login)."""
    direct_private: bool = True
    """Plain host names (no dot), ``localhost``, loopback and private IPv4/IPv6 literals go
    DIRECT rather than through the tunnel."""
    direct_hosts: list[str] = []
    """Host names that go DIRECT: ``intranet.example.com``, or ``.corp.example.com`` /
    ``*.corp.example.com`` for a domain and every name under it (names only: no DNS lookups)."""
    direct_cidrs: list[str] = []
    """IPv4 ranges (``100.64.0.0/10``) that go DIRECT when a URL names an address in them."""
    proxy_address: OptionalText = None
    """``host:port`` the PAC sends browsers to; unset: the proxy's listening address, or for
    ``0.0.0.0`` the host the PAC was fetched from."""


class StatusConfig(_Model):
    """The agent's status pages: ``GET /`` (HTML) and ``GET /status`` (JSON) on the proxy port."""

    enabled: bool = True
    """Answer ``/`` and ``/status`` (``fluidity status`` reads ``/status``)."""
    allow_remote: bool = False
    """Show them to clients other than this machine (with ``proxy_auth.users``, after an
    ``Authorization: Basic`` login); otherwise they get 403."""
    recent_errors: int = 20
    """Warnings and errors the status keeps (the most recent; each at most 500 characters)."""


class UpstreamConfig(_Model):
    """How the link reaches the server through a corporate proxy (``upstream_proxy`` et al.)."""

    use_environment: bool = True
    """Without ``upstream_proxy``/``upstream_pac``, use ``HTTPS_PROXY``/``HTTP_PROXY`` (and
    ``NO_PROXY``) from the environment; a loopback server is always reached directly."""
    username: OptionalText = None
    """User for proxies whose URL carries none (``DOMAIN\\user`` or ``user@REALM`` for NTLM and
    Negotiate). With no user anywhere, NTLM/Negotiate use the logged-in user's credentials where
    the platform has them (Kerberos ticket, Windows SSPI, ``NTLM_USER_FILE``)."""
    password: SecretStr | None = None
    """Password for ``username`` (write ``"${PROXY_PASSWORD}"``)."""
    max_auth_rounds: int = 6
    """407 answers handled per connection attempt before giving up with a clear error."""
    pac_refresh: Duration = 300.0
    """How often ``upstream_pac`` is fetched and evaluated again."""
    pac_fetch_timeout: Duration = 10.0
    """Time to download ``upstream_pac``."""
    pac_eval_timeout: Duration = 10.0
    """Time the PAC evaluation (a child process) may take before it is killed."""
    max_pac_bytes: Size = 1024 * 1024
    """Largest ``upstream_pac`` accepted."""


class AgentConfig(_Model):
    """``fluidity agent``: the local proxy and its link to the server."""

    server_ip: Annotated[str | None, BeforeValidator(_empty_is_none)] = None
    """Address (IP or host name) of the server; ``--server-ip`` sets it at start."""
    server_port: int = 8443
    """The server's port."""
    server_name: str = "fluidity-server"
    """Name the server certificate must carry, whatever address is dialled."""
    local_proxy_addr: str = "127.0.0.1"
    """Address of the local proxy. A non-loopback address needs ``proxy_auth.users``, or
    ``allow_open_proxy``."""
    local_proxy_port: int = 8080
    """Port of the local proxy: HTTP and SOCKS5 (told apart by the first byte)."""
    socks_port: int | None = None
    """An extra port on ``local_proxy_addr`` for SOCKS5 only (0 picks a free one; unset: none)."""
    allow_open_proxy: bool = False
    """Allow a non-loopback ``local_proxy_addr`` without ``proxy_auth.users``: anyone who can
    reach it can use your tunnel. Logs a warning at every start."""
    proxy_auth: ProxyAuthConfig = ProxyAuthConfig()
    """Users of the proxy (see the proxy_auth section)."""
    socks: SocksConfig = SocksConfig()
    """SOCKS5 settings (see the socks section)."""
    pac: PacConfig = PacConfig()
    """The PAC file served at ``/proxy.pac`` (see the pac section)."""
    status: StatusConfig = StatusConfig()
    """The status pages (see the status section)."""
    upstream_proxy: OptionalText = None
    """Corporate HTTP proxy the link goes through with CONNECT:
    ``http://user:password@host:port`` (percent-encode ``\\`` as ``%5C``, ``@`` as ``%40``).
    Answers Basic, NTLM and Negotiate. Unset: ``upstream_pac``, then the environment."""
    upstream_pac: OptionalText = None
    """PAC file (http(s) URL, ``file://`` URL or path) evaluated for the server's address to
    choose the proxy, when ``upstream_proxy`` is unset. A broken PAC is logged; the last good
    one (or DIRECT) is used."""
    upstream: UpstreamConfig = UpstreamConfig()
    """Credentials and limits for the upstream proxy (see the upstream section)."""
    cert_file: Path = Path("certs/client.crt")
    """This agent's certificate (PEM), issued by the server's CA."""
    key_file: Path = Path("certs/client.key")
    """This agent's private key (PEM)."""
    ca_cert_file: Path = Path("certs/ca.crt")
    """CA that must have signed the server certificate."""
    tunnel: TunnelConfig = TunnelConfig()
    http: HttpConfig = HttpConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    """Wake/release through the control plane (see the lifecycle section)."""
    shutdown_grace: Duration = 10.0
    """On SIGTERM/SIGINT: time open streams get to finish before being closed."""
    log_level: LogLevel = "info"
    """debug, info, warning or error (also ``FLUIDITY_LOG_LEVEL``)."""
    log_format: LogFormat = "text"
    """``text`` (key=value lines) or ``json`` (one object a line, for CloudWatch Logs Insights)."""


class LocalBackendConfig(_Model):
    """``fluidity control serve --backend local``: the server is a process on this machine."""

    server_config: Path | None = None
    """Config file of the ``fluidity server`` it starts (unset: built-in defaults)."""
    server_command: list[str] = []
    """Command that starts the server (unset: this Python's ``-m fluidity server``);
    ``--config`` is appended when ``server_config`` is set."""
    public_host: str = "127.0.0.1"
    """Address reported as ``public_ip`` while the server runs (what agents dial)."""
    admin_port: int = 0
    """Loopback port given to the server's admin endpoint (``FLUIDITY_ADMIN_PORT``), from which
    activity is read; 0 = a free port chosen at start."""
    stop_timeout: Duration = 15.0
    """After SIGTERM, time the server has to drain and exit before SIGKILL."""


class EcsBackendConfig(_Model):
    """``fluidity control serve --backend ecs``: the server is an ECS service (boto3)."""

    cluster_name: str = "fluidity"
    """ECS cluster of the service (also the ``ClusterName`` metric dimension)."""
    service_name: str = "fluidity-server"
    """ECS service whose desired count is set (also the ``ServiceName`` metric dimension)."""
    region: OptionalText = None
    """AWS region (unset: boto3's usual resolution, e.g. ``AWS_REGION``)."""
    endpoint_url: OptionalText = None
    """Send every AWS call here instead (a test double such as moto)."""


class ControlConfig(_Model):
    """``fluidity control serve``: the lifecycle API (wake, sleep, kill, status) and schedule."""

    backend: Literal["local", "ecs"] = "local"
    """Where the server runs: ``local`` (a process here) or ``ecs`` (an ECS service)."""
    listen_addr: str = "127.0.0.1"
    """Address of the control API."""
    listen_port: int = 8090
    """Port of the control API (0 = any free port)."""
    api_key: OptionalText = None
    """Shared key every request must send as ``x-api-key`` (required; e.g.
    ``"${FLUIDITY_CONTROL_KEY}"``)."""
    idle_threshold: Duration = 900.0
    """Put the server to sleep after this long with no tunnelled activity."""
    startup_grace: Duration = 300.0
    """Never put a server to sleep within this long of its start."""
    release_window: Duration = 120.0
    """An agent's release stops the server only if no other agent was active this recently."""
    sleep_check_interval: Duration = 300.0
    """Seconds between idle checks (0 = no scheduled sleep)."""
    daily_kill_time: str = "23:00"
    """UTC time ``HH:MM`` of the daily kill (empty = none)."""
    metrics_namespace: str = "Fluidity"
    """CloudWatch namespace read by the ECS backend."""
    metric_lookback: Duration = 1800.0
    """How far back the ECS backend reads metrics."""
    local: LocalBackendConfig = LocalBackendConfig()
    ecs: EcsBackendConfig = EcsBackendConfig()
    log_level: LogLevel = "info"
    """debug, info, warning or error (also ``FLUIDITY_LOG_LEVEL``)."""
    log_format: LogFormat = "text"
    """``text`` (key=value lines) or ``json`` (one object a line)."""


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(
    model: type[ModelT],
    path: Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Build ``model`` from defaults, the YAML file, ``FLUIDITY_*`` variables and ``overrides``.

    ``overrides`` maps dotted key paths (``"tunnel.connections"``) to values from flags; ``None``
    values are skipped so unset flags do not override. Raises :class:`ConfigError` naming the
    file, the key and what is expected.
    """
    env = os.environ if environ is None else environ
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        data = _substitute(loaded or {}, env, path, "")
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and value != "":
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            if _is_field(model, dotted):
                _set_dotted(data, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, model, source)) from None


def _substitute(node: Any, env: Mapping[str, str], path: Path, where: str) -> Any:
    if isinstance(node, dict):
        return {
            k: _substitute(v, env, path, f"{where}.{k}" if where else str(k))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, env, path, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{path}: {where}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}} to give a default)"
            )

        return _ENV_REF.sub(replace, node)
    return node


def _is_field(model: type[BaseModel], dotted: str) -> bool:
    current: Any = model
    for part in dotted.split("."):
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return False
        current = fields[part].annotation
    return True


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _explain(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            hint = _suggest(model, [str(p) for p in error["loc"]])
            lines.append(f"  {key}: unknown key{hint}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        got = repr(error.get("input"))
        lines.append(f"  {key}: {message}" + ("" if got in message else f" (got {got})"))
    return "\n".join(lines)


def _suggest(model: type[BaseModel], loc: list[str]) -> str:
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return ""
        current = fields[part].annotation
    names = list(getattr(current, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"
