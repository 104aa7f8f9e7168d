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
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from fluidity.errors import ConfigError

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


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
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
    max_connections: int = 64
    """Agent links accepted at once; more are refused at the TLS layer with a log line."""
    max_streams_per_connection: int = 1024
    """Streams open at once on one link; further opens get the LIMIT code (agent answers 503)."""
    dial_timeout: Duration = 10.0
    """Time to resolve and connect a target before answering TIMEOUT."""
    handshake_timeout: Duration = 10.0
    """Time a new connection has to complete TLS and send HELLO."""
    stream_window: Size = 256 * 1024
    """Flow-control window per stream: the most bytes in flight towards this side per stream."""
    max_frame_size: Size = 64 * 1024
    """Largest DATA frame payload; smaller interleaves streams more finely."""
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
    stream_window: Size = 256 * 1024
    """Flow-control window per stream: bytes the server may send before the agent returns credit."""
    max_frame_size: Size = 64 * 1024
    """Largest DATA frame payload."""
    stream_buffer: Size = 256 * 1024
    """Bytes queued per stream for the link before the writer waits (backpressure)."""


class HttpConfig(_Model):
    """Limits of the agent's HTTP proxy front end."""

    max_header_bytes: Size = 64 * 1024
    """Largest request head (request line and headers); larger gets 431."""
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


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


class AgentConfig(_Model):
    """``fluidity agent``: the local proxy and its link to the server."""

    server_ip: Annotated[str | None, BeforeValidator(_empty_is_none)] = None
    """Address (IP or host name) of the server; ``--server-ip`` sets it at start."""
    server_port: int = 8443
    """The server's port."""
    server_name: str = "fluidity-server"
    """Name the server certificate must carry, whatever address is dialled."""
    local_proxy_addr: str = "127.0.0.1"
    """Address of the local proxy. A non-loopback address needs ``allow_non_loopback``."""
    local_proxy_port: int = 8080
    """Port of the local HTTP proxy."""
    allow_non_loopback: bool = False
    """Allow ``local_proxy_addr`` to be reachable from other machines (logs a warning)."""
    cert_file: Path = Path("certs/client.crt")
    """This agent's certificate (PEM), issued by the server's CA."""
    key_file: Path = Path("certs/client.key")
    """This agent's private key (PEM)."""
    ca_cert_file: Path = Path("certs/ca.crt")
    """CA that must have signed the server certificate."""
    tunnel: TunnelConfig = TunnelConfig()
    http: HttpConfig = HttpConfig()
    shutdown_grace: Duration = 10.0
    """On SIGTERM/SIGINT: time open streams get to finish before being closed."""
    log_level: LogLevel = "info"
    """debug, info, warning or error (also ``FLUIDITY_LOG_LEVEL``)."""
    log_format: LogFormat = "text"
    """``text`` (key=value lines) or ``json`` (one object a line, for CloudWatch Logs Insights)."""


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
