"""What the agent says about itself: ``GET /`` (HTML), ``GET /status`` (JSON), ``/proxy.pac``.

These are origin-form requests to the proxy port (``curl http://127.0.0.1:8080/status``), handed
to :class:`AgentPages` by the HTTP proxy. The status pages are shown to loopback clients only,
unless ``status.allow_remote`` is set (then, with ``proxy_auth`` users, behind Basic
``Authorization``); the PAC file is served to anyone who can reach the port, as browsers fetch it
without credentials.

:class:`AgentStatus` gathers the figures: link state and server, uptime, open streams, bytes each
way over the link (DATA payload), client counters, and recent warnings and errors (the agent's own
log events, which never hold secrets), plus the lifecycle state when a lifecycle is attached.
"""

from __future__ import annotations

import asyncio
import functools
import html
import ipaddress
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fluidity import __version__
from fluidity.agent.first_read import current_client
from fluidity.agent.http_messages import LocalRequest, LocalResponse, format_target
from fluidity.agent.pac import PAC_CONTENT_TYPE, build_pac

if TYPE_CHECKING:
    from fluidity.agent.auth import ProxyAuthenticator
    from fluidity.agent.frontdoor import FrontDoor
    from fluidity.agent.link import AgentLink
    from fluidity.agent.tunnel import Tunnel

_HOST_HEADER = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_SAMPLE_INTERVAL = 1.0  # seconds between looks at the tunnel's links, for the byte totals


@dataclass(frozen=True, slots=True)
class PacSettings:
    """What ``GET /proxy.pac`` serves (see :func:`fluidity.agent.pac.build_pac`)."""

    enabled: bool = True
    direct_private: bool = True
    direct_hosts: tuple[str, ...] = ()
    direct_cidrs: tuple[str, ...] = ()
    proxy_address: str | None = None


class _RecentErrors(logging.Handler):
    """Keeps the last ``size`` warning-or-worse records of the ``fluidity`` loggers."""

    def __init__(self, size: int) -> None:
        super().__init__(logging.WARNING)
        self.items: deque[dict[str, str]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
        event = getattr(record, "fluidity_event", None) or record.getMessage().split(" ", 1)[0]
        self.items.append(
            {
                "time": when,
                "level": record.levelname.lower(),
                "event": str(event),
                "message": record.getMessage()[:500],
            }
        )


class AgentStatus:
    """Live figures of one agent; :meth:`snapshot` returns them as a JSON-ready dict.

    ``lifecycle`` returns the lifecycle state (e.g. ``"waking"``) when the agent has one.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        front: FrontDoor,
        *,
        auth: ProxyAuthenticator | None = None,
        upstream: str = "direct",
        recent_errors: int = 20,
        lifecycle: Callable[[], str | None] | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.front = front
        self.auth = auth
        self.upstream = upstream
        self.lifecycle = lifecycle
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self._errors = _RecentErrors(recent_errors)
        self._live: dict[int, AgentLink] = {}
        self._closed_sent = 0
        self._closed_received = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        logging.getLogger("fluidity").addHandler(self._errors)
        self._sample()

    def stop(self) -> None:
        logging.getLogger("fluidity").removeHandler(self._errors)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sample(self) -> None:
        self._adopt_links()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(_SAMPLE_INTERVAL, self._sample)

    def _adopt_links(self) -> None:
        """Watch new links so their bytes still count after they close. Links are seen every
        second and at every snapshot: one that lived and died in between is not counted."""
        for link in self.tunnel.links:
            if id(link) not in self._live and not link.closed.done():
                self._live[id(link)] = link
                link.closed.add_done_callback(functools.partial(self._link_closed, link))

    def _link_closed(self, link: AgentLink, _: object = None) -> None:
        if self._live.pop(id(link), None) is not None:
            self._closed_sent += link.session.bytes_sent
            self._closed_received += link.session.bytes_received

    def link_state(self) -> str:
        state = self.tunnel.state
        lifecycle = self.lifecycle() if self.lifecycle else None
        if state != "connected" and lifecycle == "waking":
            return "waking"
        return state

    def snapshot(self) -> dict[str, Any]:
        self._adopt_links()
        tunnel, front = self.tunnel, self.front
        live = list(self._live.values())
        rtts = [link.rtt_ms for link in tunnel.links if link.rtt_ms is not None]
        tuners = [t for link in tunnel.links if (t := link.session.window_tuner) is not None]
        socks = front.socks
        proxy = front.proxy
        return {
            "version": __version__,
            "link": {
                "state": self.link_state(),
                "server": tunnel.address,
                "server_name": tunnel.server_name,
                "links_up": sum(1 for link in tunnel.links if link.usable),
                "rtt_ms": round(min(rtts), 2) if rtts else None,
                # Downloads held back by their window on a long path: how often their windows
                # grew, how often they shrank off a queue, and how much they hold now beyond
                # stream_window (see docs/protocol.md, section 6).
                "windows_grown": sum(t.windows_grown for t in tuners),
                "windows_shrunk": sum(t.windows_shrunk for t in tuners),
                "window_growth_bytes": sum(t.grown_bytes for t in tuners),
                # The DATA frame size the agent asks the server for: below max_frame_size only
                # on a slow path, where large frames hold up every other stream.
                "frame_size_asked": min((t.frame_size for t in tuners), default=None),
                "last_error": tunnel.last_error or None,
                "via": self.upstream,
            },
            "lifecycle": self.lifecycle() if self.lifecycle else None,
            "started_at": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.monotonic() - self._started_monotonic, 1),
            "listening": {
                "proxy": [f"{h}:{p}" for h, p in proxy.addresses],
                "socks_only": [f"{h}:{p}" for h, p in front.socks_addresses],
            },
            "streams_open": tunnel.open_streams,
            "bytes": {
                "sent": self._closed_sent + sum(link.session.bytes_sent for link in live),
                "received": self._closed_received
                + sum(link.session.bytes_received for link in live),
            },
            "clients": {
                "active_connections": front.active_connections,
                "http_requests": proxy.requests,
                "socks_connections": socks.total_connections if socks else 0,
                "open_failures": proxy.open_failures + (socks.open_failures if socks else 0),
                "auth_failures": self.auth.failures if self.auth else 0,
            },
            "recent_errors": list(self._errors.items),
        }


class AgentPages:
    """The proxy's ``local_handler``: status pages and the PAC file."""

    def __init__(
        self,
        status: AgentStatus | None,
        pac: PacSettings,
        *,
        listening: Callable[[], tuple[str, int]],
        auth: ProxyAuthenticator | None = None,
        allow_remote: bool = False,
    ) -> None:
        self.listening = listening  # the proxy's (host, port), for the PAC file
        self.status = status
        self.pac = pac
        self.auth = auth
        self.allow_remote = allow_remote

    async def __call__(self, request: LocalRequest) -> LocalResponse:
        path = request.target.split("?", 1)[0]
        if path.startswith(("http://", "https://")):  # absolute-form naming the agent itself
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        known = (self.pac.enabled and path == "/proxy.pac") or (
            self.status is not None and path in ("/", "/status")
        )
        if not known:
            return _text(404, "fluidity: no such page here (try /status or /proxy.pac)\n")
        if request.method not in ("GET", "HEAD"):
            return LocalResponse(
                405, b"fluidity: only GET here\n", headers=(("Allow", "GET, HEAD"),)
            )
        if path == "/proxy.pac":
            return self._pac_file(request)
        assert self.status is not None
        refusal = self._check_client(request)
        if refusal is not None:
            return refusal
        snapshot = self.status.snapshot()
        headers = (("Cache-Control", "no-store"),)
        if path == "/status":
            body = json.dumps(snapshot, indent=2).encode() + b"\n"
            return LocalResponse(200, body, "application/json", headers)
        return LocalResponse(
            200, render_html(snapshot).encode(), "text/html; charset=utf-8", headers
        )

    def _check_client(self, request: LocalRequest) -> LocalResponse | None:
        client = current_client()
        if _is_loopback(client):
            return None
        if not self.allow_remote:
            return _text(
                403,
                "fluidity: the status page is only shown on this machine "
                "(set status.allow_remote: true to show it to others)\n",
            )
        if self.auth is not None:
            headers = [
                (n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in request.headers
            ]
            return self.auth.authorize_page(headers)
        return None

    def _pac_file(self, request: LocalRequest) -> LocalResponse:
        pac = self.pac
        address = pac.proxy_address or self._advertised_address(request)
        text = build_pac(
            address,
            direct_private=pac.direct_private,
            direct_hosts=pac.direct_hosts,
            direct_cidrs=pac.direct_cidrs,
        )
        return LocalResponse(200, text.encode(), PAC_CONTENT_TYPE, (("Cache-Control", "no-cache"),))

    def _advertised_address(self, request: LocalRequest) -> str:
        """Where browsers should send traffic: the listening address, or, when the agent listens
        on every interface, the host the PAC was fetched from (its Host header)."""
        host, port = self.listening()
        if host in ("0.0.0.0", "::"):
            host = _host_from_header(request) or "127.0.0.1"
        return format_target(host, port)


def _host_from_header(request: LocalRequest) -> str | None:
    for name, raw in request.headers:
        if name.lower() == "host":
            value = raw.strip()
            if not _HOST_HEADER.match(value):
                return None
            if value.startswith("["):
                return value[1 : value.index("]")]
            return value.split(":", 1)[0]
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _text(status: int, text: str) -> LocalResponse:
    return LocalResponse(status, text.encode())


def render_html(snapshot: dict[str, Any]) -> str:
    """A small self-refreshing page with the figures of :meth:`AgentStatus.snapshot`."""
    link = snapshot["link"]
    rows = [
        ("Link", link["state"]),
        ("Server", f"{link['server']} (certificate name {link['server_name']})"),
        ("Route", link["via"]),
        ("Round trip", f"{link['rtt_ms']} ms" if link["rtt_ms"] is not None else "-"),
        (
            "Stream windows grown / shrunk",
            f"{link['windows_grown']} / {link['windows_shrunk']} (now "
            f"{link['window_growth_bytes']} bytes beyond stream_window)",
        ),
        ("Frame size asked of the server", f"{link['frame_size_asked'] or '-'} bytes"),
        ("Last link error", link["last_error"] or "-"),
        ("Lifecycle", snapshot["lifecycle"] or "-"),
        ("Up since", f"{snapshot['started_at']} ({snapshot['uptime_seconds']:.0f} s)"),
        ("Open streams", snapshot["streams_open"]),
        ("Bytes sent / received", f"{snapshot['bytes']['sent']} / {snapshot['bytes']['received']}"),
        ("Client connections", snapshot["clients"]["active_connections"]),
        ("Proxy", ", ".join(snapshot["listening"]["proxy"]) + " (HTTP and SOCKS5)"),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"
        for name, value in rows
    )
    errors = (
        "\n".join(
            f"<li><code>{html.escape(e['time'])} {html.escape(e['message'])}</code></li>"
            for e in reversed(snapshot["recent_errors"])
        )
        or "<li>none</li>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Fluidity agent: {html.escape(link["state"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:2em}}</style>
</head><body>
<h1>Fluidity agent {html.escape(snapshot["version"])}</h1>
<table>
{table}
</table>
<h2>Recent warnings and errors</h2>
<ul>
{errors}
</ul>
<p>JSON: <a href="/status">/status</a> &middot; PAC file: <a href="/proxy.pac">/proxy.pac</a></p>
</body></html>
"""
