"""Reaching the server through a corporate HTTP proxy: where the route comes from, and CONNECT.

The first source that applies wins:

1. ``upstream_proxy`` in the config (``http://user:password@host:port``): always used.
2. ``upstream_pac`` (a URL or a file): the PAC is asked about ``https://<server>:<port>/``; its
   ``PROXY`` entries are tried in order, ``DIRECT`` means no proxy (see :mod:`fluidity.agent.pac`).
3. ``https_proxy``/``HTTPS_PROXY``, then ``http_proxy``/``HTTP_PROXY`` (lowercase wins, as in
   Python and curl), unless ``NO_PROXY`` matches the server, or the server is a loopback address
   (a proxy elsewhere cannot reach your loopback).
4. Otherwise the link connects directly.

:class:`UpstreamConnector` is the tunnel's ``connector``: it returns a TCP socket on which the TLS
handshake with the server can start. Through a proxy it sends ``CONNECT server:port`` and answers
407s with Basic, NTLM or Negotiate (:mod:`fluidity.agent.upstream_auth`). Every failure raises
:class:`UpstreamError` (a ``ConnectionError``) with one sentence naming the proxy, what it asked
for and what to do; the tunnel logs it as ``link.down reason=...`` and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import h11

from fluidity import __version__
from fluidity.agent.http_messages import format_target
from fluidity.agent.upstream_auth import (
    SUPPORTED_SCHEMES,
    AuthUnavailableError,
    Credentials,
    SchemeAuth,
    choose_scheme,
    display_scheme,
    parse_challenges,
)
from fluidity.agent.upstream_routes import DIRECT, ProxyEndpoint, Route
from fluidity.logs import log

if TYPE_CHECKING:
    from fluidity.agent.pac import UpstreamPac

logger = logging.getLogger("fluidity.agent.upstream")


class UpstreamError(ConnectionError):
    """The link could not get through the upstream proxy; the message says why and what to do."""


class ProxyUnreachableError(UpstreamError):
    """The proxy itself could not be reached (the next PAC entry may be tried)."""


class UpstreamConnector:
    """Opens the TCP connection for each link: through ``proxy``, the routes of ``pac``, or direct.

    ``credentials`` apply to proxies whose URL carries none. ``max_auth_rounds`` bounds the 407s
    answered per connection attempt (a proxy that keeps asking gets a clear error, not a loop);
    ``max_header_bytes`` bounds a proxy's response head, and the error page read (and discarded)
    after it. Call the object to get a socket.
    """

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        proxy: ProxyEndpoint | None = None,
        pac: UpstreamPac | None = None,
        credentials: Credentials | None = None,
        max_auth_rounds: int = 6,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.target = format_target(server_host, server_port)
        self.proxy = proxy
        self.pac = pac
        self.credentials = credentials or Credentials()
        self.max_auth_rounds = max_auth_rounds
        self.max_header_bytes = max_header_bytes
        self._worked: dict[str, str] = {}  # proxy address -> scheme that was accepted last
        self._last_route = ""

    def describe(self) -> str:
        """Where the link goes, for the start-up log line (never credentials)."""
        if self.proxy is not None:
            return f"proxy {self.proxy.address} (from {self.proxy.source})"
        if self.pac is not None:
            return f"as the PAC at {self.pac.source} says"
        return "direct"

    async def __call__(self) -> socket.socket:
        last: OSError | None = None
        for route in await self._routes():
            try:
                if isinstance(route, str):
                    sock = await open_tcp(self.server_host, self.server_port)
                else:
                    sock = await self.connect_through(route)
            except ProxyUnreachableError as exc:
                last = exc  # a PAC may name another proxy, or DIRECT, next
                continue
            except UpstreamError:
                raise
            except OSError as exc:
                last = exc
                continue
            name = "direct" if isinstance(route, str) else f"proxy {route.address}"
            if name != self._last_route:  # one line when the route changes, not per link
                self._last_route = name
                log(logger, logging.INFO, "upstream.route", server=self.target, via=name)
            return sock
        raise last or UpstreamError("no route to the server")

    async def _routes(self) -> list[Route]:
        if self.proxy is not None:
            return [self.with_credentials(self.proxy)]
        if self.pac is not None:
            found = await self.pac.routes_for(f"https://{self.target}/", self.server_host)
            return [
                route if isinstance(route, str) else self.with_credentials(route) for route in found
            ]
        return [DIRECT]

    def with_credentials(self, proxy: ProxyEndpoint) -> ProxyEndpoint:
        """``proxy`` with the configured credentials when its URL carries none."""
        if proxy.credentials.username is not None:
            return proxy
        return replace(proxy, credentials=self.credentials)

    # --- CONNECT ---------------------------------------------------------------------------------

    async def connect_through(self, proxy: ProxyEndpoint) -> socket.socket:
        """A socket to the server through ``proxy`` after a successful CONNECT."""
        link = _ProxyConnection(await _open_proxy(proxy), self._new_connection())
        try:
            await self._negotiate(link, proxy)
        except BaseException:
            link.sock.close()
            raise
        return link.sock

    async def _negotiate(self, link: _ProxyConnection, proxy: ProxyEndpoint) -> None:
        tried: set[str] = set()
        unavailable: dict[str, str] = {}
        refused: list[str] = []
        auth: SchemeAuth | None = None
        header: str | None = None
        preferred = self._worked.get(proxy.address)
        if preferred is not None:  # answer the known scheme up front: saves a round trip
            auth = SchemeAuth(preferred, proxy.credentials, proxy.host)
            with contextlib.suppress(AuthUnavailableError):
                header = auth.first()
            if header is None:
                auth = None
        for _ in range(self.max_auth_rounds + 1):
            status, reason, headers = await self._exchange(link, proxy, header)
            if 200 <= status < 300:
                if link.conn.trailing_data[0]:
                    raise UpstreamError(
                        f"upstream proxy {proxy.address} sent data before the server spoke"
                    )
                if auth is not None:
                    self._worked[proxy.address] = auth.scheme
                return
            if status != 407:
                raise UpstreamError(self._refusal(proxy, status, reason))
            challenges = parse_challenges([v for k, v in headers if k == b"proxy-authenticate"])
            header = None
            if auth is not None and auth.scheme in challenges:
                header = auth.respond(challenges[auth.scheme])
            if header is None:
                if auth is not None:
                    tried.add(auth.scheme)
                    refused.append(auth.scheme)
                    self._worked.pop(proxy.address, None)
                auth, header = self._start_scheme(challenges, tried, unavailable, proxy)
                if auth is None or header is None:
                    raise UpstreamError(self._auth_failure(proxy, challenges, refused, unavailable))
            conn = link.conn
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:  # the proxy closes after its 407: go on over a new connection
                link.sock.close()
                link.sock = await _open_proxy(proxy)
                link.conn = self._new_connection()
                if auth is not None and auth.scheme != "basic":
                    # NTLM and Negotiate are bound to a connection: start over on the new one.
                    auth = SchemeAuth(auth.scheme, proxy.credentials, proxy.host)
                    header = auth.first()
        scheme = display_scheme(auth.scheme) if auth is not None else "none"
        raise UpstreamError(
            f"upstream proxy {proxy.address} answered 407 {self.max_auth_rounds + 1} times in a "
            f"row ({scheme}) without accepting or refusing: check the credentials, and that the "
            "proxy keeps the connection open between 407 and the next request"
        )

    def _new_connection(self) -> h11.Connection:
        return h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_header_bytes)

    def _start_scheme(
        self,
        challenges: dict[str, str],
        tried: set[str],
        unavailable: dict[str, str],
        proxy: ProxyEndpoint,
    ) -> tuple[SchemeAuth | None, str | None]:
        while (scheme := choose_scheme(challenges, tried)) is not None:
            tried.add(scheme)
            auth = SchemeAuth(scheme, proxy.credentials, proxy.host)
            try:
                return auth, auth.first()
            except AuthUnavailableError as exc:
                unavailable[scheme] = str(exc)
        return None, None

    async def _exchange(
        self, link: _ProxyConnection, proxy: ProxyEndpoint, auth: str | None
    ) -> tuple[int, str, list[tuple[bytes, bytes]]]:
        """Send one CONNECT; return the status, reason and headers (the body is discarded)."""
        loop = asyncio.get_running_loop()
        sock, conn = link.sock, link.conn
        headers = [("Host", self.target), ("User-Agent", f"fluidity/{__version__}")]
        if auth is not None:
            headers.append(("Proxy-Authorization", auth))
        request = h11.Request(method="CONNECT", target=self.target, headers=headers)
        response: h11.Response | None = None
        body = 0
        eof = False
        try:
            # Inside the try: a proxy that closed a kept-alive connection after its 407 can
            # make the send fail (EPIPE, reset), which is the same "closed during CONNECT".
            await loop.sock_sendall(sock, conn.send(request) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await loop.sock_recv(sock, 64 * 1024)
                    eof = not data
                    conn.receive_data(data)
                elif type(event) is h11.Response:
                    response = event
                    if 200 <= event.status_code < 300:
                        break  # the tunnel is open: nothing more belongs to HTTP
                elif type(event) is h11.Data:
                    body += len(event.data)
                    if body > self.max_header_bytes:
                        raise UpstreamError(
                            f"upstream proxy {proxy.address} sent an error page over "
                            f"{self.max_header_bytes} bytes"
                        )
                elif type(event) is h11.EndOfMessage:
                    break
                elif type(event) is h11.ConnectionClosed:
                    raise UpstreamError(self._closed(proxy))
        except h11.RemoteProtocolError as exc:
            if eof:
                raise UpstreamError(self._closed(proxy)) from None
            raise UpstreamError(
                f"upstream proxy {proxy.address} sent a malformed answer to CONNECT: "
                f"{' '.join(str(exc).split())[:120]}"
            ) from None
        except ConnectionError as exc:
            if isinstance(exc, UpstreamError):
                raise
            raise UpstreamError(self._closed(proxy)) from None
        assert response is not None  # EndOfMessage only follows a response
        reason = response.reason.decode("latin-1", "replace") or _phrase(response.status_code)
        return response.status_code, reason, list(response.headers)

    # --- messages --------------------------------------------------------------------------------

    def _closed(self, proxy: ProxyEndpoint) -> str:
        return (
            f"upstream proxy {proxy.address} closed the connection during CONNECT "
            f"{self.target} (is it an HTTP proxy, and does it allow CONNECT to this port?)"
        )

    def _refusal(self, proxy: ProxyEndpoint, status: int, reason: str) -> str:
        text = f"upstream proxy {proxy.address} answered {status} {reason} to CONNECT {self.target}"
        if status == 403:
            return (
                f"{text}: it forbids this destination or port; ask IT to allow {self.target}, "
                "or run the server on port 443"
            )
        if status in (502, 503, 504):
            return f"{text}: the proxy could not reach the server (is it running and reachable?)"
        return text

    def _auth_failure(
        self,
        proxy: ProxyEndpoint,
        challenges: dict[str, str],
        refused: list[str],
        unavailable: dict[str, str],
    ) -> str:
        asked = ", ".join(display_scheme(s) for s in challenges) or "no scheme"
        prefix = f"upstream proxy {proxy.address} asks for {asked} authentication (407)"
        user = proxy.credentials.username
        if refused:
            names = ", ".join(display_scheme(s) for s in refused)
            who = f"user '{user}'" if user else "this login session"
            hint = (
                "check the user name (DOMAIN\\user for NTLM) and password in upstream_proxy"
                if user
                else "set a user name and password in upstream_proxy"
            )
            return f"{prefix} and refused the {names} credentials of {who}: {hint}"
        if not any(s in challenges for s in SUPPORTED_SCHEMES):
            return (
                f"{prefix}, which Fluidity cannot answer (it speaks Negotiate, NTLM and Basic): "
                "ask IT for one of those, or chain through a local helper such as px or cntlm"
            )
        details = "; ".join(unavailable.values())
        return (
            f"{prefix} and no usable credentials are configured ({details}): set "
            f"upstream_proxy: http://USER:PASSWORD@{proxy.address}"
        )


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


@dataclass(slots=True)
class _ProxyConnection:
    """The TCP connection to the proxy of one attempt, and its HTTP state (both may be renewed)."""

    sock: socket.socket
    conn: h11.Connection


def describe_oserror(exc: OSError) -> str:
    """The errno's own text ("Connection refused"), not asyncio's "Connect call failed (...)"."""
    if exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


async def _open_proxy(proxy: ProxyEndpoint) -> socket.socket:
    try:
        return await open_tcp(proxy.host, proxy.port)
    except OSError as exc:
        reason = describe_oserror(exc)
        raise ProxyUnreachableError(
            f"cannot reach upstream proxy {proxy.address} (from {proxy.source}): {reason}"
        ) from None


async def open_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port`` (addresses tried in resolver order)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise errors[0] if errors else OSError(f"no address for {host}")
