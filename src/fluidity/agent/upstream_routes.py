"""Where the agent's link goes: a proxy (from a URL or the environment) or DIRECT.

:func:`parse_proxy_url` reads ``upstream_proxy`` and proxy variables;
:func:`proxy_from_environment` applies ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY`` as curl
does (lowercase names win; a loopback server is always reached directly). Routes chosen by a PAC
come from :mod:`fluidity.agent.pac`.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from fluidity.agent.http_messages import format_target
from fluidity.agent.upstream_auth import Credentials
from fluidity.errors import ConfigError

DIRECT = "DIRECT"


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """An HTTP proxy to send CONNECT to, with the credentials for it and where it came from."""

    host: str
    port: int
    credentials: Credentials
    source: str  # "upstream_proxy", "HTTPS_PROXY", "upstream_pac", ...

    @property
    def address(self) -> str:
        return format_target(self.host, self.port)


Route = ProxyEndpoint | str  # a proxy, or DIRECT


def parse_proxy_url(url: str, source: str) -> ProxyEndpoint:
    """``http://[user:password@]host:port`` (``host:port`` alone is accepted) as an endpoint.

    The user name and password are percent-decoded (write ``DOMAIN%5Cuser`` for ``DOMAIN\\user``,
    ``%40`` for ``@``). Raises :class:`ConfigError` naming ``source`` for anything else.
    """
    text = url.strip()
    parts = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme.lower() != "http":
        raise ConfigError(
            f"{source}: {parts.scheme}:// proxies are not supported; give the proxy's http:// "
            "address (the link inside CONNECT is still end-to-end TLS)"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"{source}: expected http://[user:password@]host:port, got a URL "
                          "without a host or port")  # fmt: skip
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return ProxyEndpoint(parts.hostname, port, Credentials(username, password), source)


def proxy_from_environment(
    server_host: str, server_port: int, environ: Mapping[str, str]
) -> ProxyEndpoint | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY`` name for the server, or ``None`` for direct."""
    if _is_loopback(server_host):
        return None
    chosen: tuple[str, str] | None = None
    for name in ("https_proxy", "http_proxy"):
        value = environ.get(name) or environ.get(name.upper())
        if value:
            chosen = (name if environ.get(name) else name.upper(), value)
            break
    if chosen is None:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if bypasses(no_proxy, server_host, server_port):
        return None
    return parse_proxy_url(chosen[1], chosen[0])


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``NO_PROXY`` (comma-separated) exempts ``host:port``, as curl reads it.

    Entries: ``*`` (everything), a domain (``example.com`` or ``.example.com``: the name and every
    name under it), an address or CIDR (``10.0.0.0/8``), each optionally with ``:port``.
    """
    name = host.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.count(":") == 1:  # host:port (an IPv6 entry has several colons)
            entry, _, entry_port = entry.partition(":")
            if entry_port != str(port):
                continue
        entry = entry.strip("[]").rstrip(".")
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry.lstrip(".").lstrip("*.") if entry.startswith(("*.", ".")) else entry
        if name == domain or name.endswith("." + domain):
            return True
    return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
