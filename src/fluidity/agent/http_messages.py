"""HTTP/1.1 proxy rules without I/O: request targets, framing checks, hop-by-hop headers, errors.

Everything here is a plain function over bytes and header lists (as :mod:`.http_codec` produces
them), so the rules a forward proxy must get right (RFC 9110 / 9112) are unit-tested without
sockets. The asyncio code
that applies them lives in :mod:`fluidity.agent.http_proxy`.
"""

from __future__ import annotations

import functools
import http
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from fluidity.agent.streams import OpenFailure

Header = tuple[bytes, bytes]

#: Request-body framing value meaning "Transfer-Encoding: chunked" (other values: ``None`` for no
#: framing header, or a Content-Length).
CHUNKED = -1

#: Largest Content-Length accepted (2**63 - 1 bytes); anything longer is treated as smuggling.
MAX_CONTENT_LENGTH = 2**63 - 1

#: Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), lowercase.
#: Transfer-Encoding is here because each side is framed anew; Upgrade is re-added when upgrading.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Never copied from the client's request: hop-by-hop fields, and the two the proxy restates.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}
_CONTENT_LENGTH_NAME = frozenset({b"content-length"})

#: Methods whose request may be replayed on a fresh upstream when a reused one was stale.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# RFC 3986 reg-name (unreserved / pct-encoded / sub-delims); IPv4 literals match it too.
_REG_NAME = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=]+")
_PORT = re.compile(rb"[0-9]{1,5}")
_CONTENT_LENGTH = re.compile(rb"[0-9]+")
# After "scheme://": the authority runs to the first "/", "?" or "#"; the path to the fragment.
# It matches every input (both groups may be empty).
_AUTHORITY_AND_PATH = re.compile(rb"([^/?#]*)([^#]*)", re.DOTALL)
_QUESTION_MARK = ord("?")


class BadRequestError(Exception):
    """The client's request cannot be proxied; ``status`` and ``reason`` become the 4xx answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class Target(NamedTuple):
    """Where a request goes: ``host`` (no brackets) and ``port`` to dial, and what to send there.

    ``authority`` is the Host header value for the origin (as written in the URL); ``path`` is the
    origin-form request target (``/path?query``, or ``*`` for ``OPTIONS http://host``).

    A named tuple rather than a frozen dataclass: one is made per proxied request, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs three times as much.
    """

    host: str
    port: int
    authority: bytes
    path: bytes

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the upstream connection this target can reuse."""
        return (self.host.lower(), self.port)

    @property
    def display(self) -> str:
        """``host:port`` for logs and error messages (IPv6 in brackets); never the path."""
        return format_target(self.host, self.port)


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """An origin-form request addressed to the proxy itself (status page and the like)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class LocalResponse:
    """The answer of a :data:`LocalHandler`; the body is sent with a Content-Length."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


#: Answers origin-form requests sent to the proxy itself.
LocalHandler = Callable[[LocalRequest], Awaitable[LocalResponse]]


def format_target(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A pure function of its arguments that a keep-alive client calls with the same authority
# request after request: the cache saves the regular expressions (invalid ones raise, and
# exceptions are never cached).
@functools.lru_cache(maxsize=256)
def parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` (``[v6]:port`` for IPv6) into a host and a port in 1..65535.

    ``default_port`` is used when the port is absent or empty; ``None`` makes the port mandatory
    (CONNECT). Raises :class:`BadRequestError` (400) for an empty host, userinfo, or a bad port.
    """
    if not authority:
        raise BadRequestError(400, "empty host")
    if b"@" in authority:
        raise BadRequestError(400, "user:password@ in the URL is not supported")
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            raise BadRequestError(400, "unterminated IPv6 literal")
        literal, rest = authority[1:end], authority[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(literal.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise BadRequestError(400, "invalid IPv6 literal") from None
        if rest and not rest.startswith(b":"):
            raise BadRequestError(400, "junk after IPv6 literal")
        port_text = rest[1:] if rest else b""
    else:
        host_bytes, _, port_text = authority.partition(b":")
        if not host_bytes:
            raise BadRequestError(400, "empty host")
        if not _REG_NAME.fullmatch(host_bytes) or len(host_bytes) > 253:
            raise BadRequestError(400, "invalid host name")
        host = host_bytes.decode("ascii").lower()
    if not port_text:
        if default_port is None:
            raise BadRequestError(400, "CONNECT target needs a port (host:port)")
        return host, default_port
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise BadRequestError(400, "port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_connect_target(target: bytes) -> Target:
    """Parse a CONNECT target (authority-form ``host:port``); raises :class:`BadRequestError`."""
    host, port = parse_authority(target, None)
    return Target(host, port, target, b"")


def parse_absolute_target(method: bytes, target: bytes) -> Target:
    """Parse an absolute-form ``http://authority/path?query`` target.

    Raises :class:`BadRequestError` (400) for anything else.

    The fragment is dropped; an empty path becomes ``/`` (``*`` for OPTIONS, RFC 9112 §3.2.4).
    ``https://`` is refused: browsers and curl tunnel it with CONNECT, and a plain proxy request
    for it would have to be sent in clear text.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise BadRequestError(
            400,
            "this is a proxy: send absolute-form requests (http://host/path) or CONNECT",
        )
    if scheme != b"http" and scheme.lower() != b"http":
        if scheme.lower() == b"https":
            raise BadRequestError(400, "https:// URLs must be tunnelled with CONNECT")
        raise BadRequestError(400, "only http:// URLs can be proxied (https via CONNECT)")
    authority, path = _AUTHORITY_AND_PATH.match(rest).groups()  # type: ignore[union-attr]
    host, port = parse_authority(authority, 80)
    if not path:
        path = b"*" if method == b"OPTIONS" else b"/"
    elif path[0] == _QUESTION_MARK:
        path = b"/" + path
    return Target(host, port, authority, path)


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Return the lowercase tokens of every Connection header (lowercase names expected)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens |= _tokens(value)
    return tokens


def _tokens(value: bytes) -> set[bytes]:
    """The lowercase tokens of one comma-separated header value, empty ones left out."""
    tokens = {t.strip().lower() for t in value.split(b",")}
    tokens.discard(b"")
    return tokens


def request_body_framing(headers: Iterable[Header]) -> int | None:
    """Check a request's framing headers; return ``None``, :data:`CHUNKED` or the Content-Length.

    Refuses (400) what request smuggling is made of: Content-Length together with
    Transfer-Encoding, differing Content-Length values, a Content-Length that is not a plain decimal
    number up to :data:`MAX_CONTENT_LENGTH`, and any Transfer-Encoding other than one ``chunked``.
    """
    lengths: set[bytes] = set()
    encodings: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif name == b"transfer-encoding":
            encodings.extend(v.strip().lower() for v in value.split(b","))
    if encodings:
        if lengths:
            raise BadRequestError(400, "both Content-Length and Transfer-Encoding")
        if encodings != [b"chunked"]:
            raise BadRequestError(400, "only Transfer-Encoding: chunked is supported")
        return CHUNKED
    if not lengths:
        return None
    if len(lengths) > 1:
        raise BadRequestError(400, "conflicting Content-Length values")
    (text,) = lengths
    if not _CONTENT_LENGTH.fullmatch(text) or len(text) > 19 or int(text) > MAX_CONTENT_LENGTH:
        raise BadRequestError(400, "invalid Content-Length")
    return int(text)


def upgrade_protocols(headers: Iterable[Header]) -> bytes | None:
    """Return the Upgrade header value when the request asks to upgrade, else ``None``.

    Both ``Upgrade`` and the ``upgrade`` token in Connection are required (RFC 9110 §7.8).
    """
    items = list(headers)
    if b"upgrade" not in connection_tokens(items):
        return None
    values = [value for name, value in items if name == b"upgrade"]
    return b", ".join(values) if values else None


def upstream_request_headers(
    raw_headers: Iterable[Header],
    *,
    authority: bytes,
    body_framing: int | None,
    upgrade: bytes | None,
    lowered: list[Header] | None = None,
) -> list[Header]:
    """Headers to send to the origin: Host from the URL, no hop-by-hop, framing restated.

    ``raw_headers`` are the client's headers with their original name case
    (``RequestHead.raw_headers``); ``lowered``, the same fields with lowercase names when the
    caller has them (``RequestHead.headers``). The client's Host is replaced by ``authority``
    (RFC 9112 §3.2.2). With ``upgrade`` set, the request carries ``Connection: Upgrade`` and that
    Upgrade value.
    """
    items = list(raw_headers)
    if lowered is None:
        lowered = [(n.lower(), v) for n, v in items]
    drop = _NOT_FORWARDED
    for name, value in lowered:
        if name == b"connection":
            tokens = _tokens(value)
            if not tokens <= drop:
                drop = drop | tokens
    out: list[Header] = [(b"Host", authority)]
    out += [item for item, (lower, _) in zip(items, lowered, strict=True) if lower not in drop]
    if body_framing == CHUNKED:
        out.append((b"Transfer-Encoding", b"chunked"))
    elif body_framing is not None:
        out.append((b"Content-Length", str(body_framing).encode()))
    if upgrade is not None:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgrade))
    return out


def downstream_response_headers(
    raw_headers: Iterable[Header], *, upgrade: bool, lowered: list[Header] | None = None
) -> list[Header]:
    """Headers to send to the client for an origin response: no hop-by-hop headers.

    Content-Length is kept (so the client sees the origin's framing) unless the origin used
    Transfer-Encoding, in which case the body is framed anew for the client. For a 101 switching
    response (``upgrade``), Connection and Upgrade are kept. ``lowered``: the same fields with
    lowercase names, when the caller has them (``ResponseHead.headers``).
    """
    items = list(raw_headers)
    if lowered is None:
        lowered = [(n.lower(), v) for n, v in items]
    # One pass to learn what to drop (hop-by-hop names are rare, so one set lookup per field),
    # one to filter: this runs once per proxied response.
    drop = HOP_BY_HOP
    for name, value in lowered:
        if name in HOP_BY_HOP:
            if name == b"connection":
                tokens = _tokens(value)
                if not tokens <= drop:
                    drop = drop | tokens
            elif name == b"transfer-encoding":
                drop = drop | _CONTENT_LENGTH_NAME
    out = [item for item, (lower, _) in zip(items, lowered, strict=True) if lower not in drop]
    if upgrade:
        out.append((b"Connection", b"Upgrade"))
        out.extend((b"Upgrade", value) for name, value in lowered if name == b"upgrade")
    return out


_FAILURE_STATUS = {
    OpenFailure.DENIED: 403,
    OpenFailure.TIMEOUT: 504,
    OpenFailure.TUNNEL_DOWN: 503,
    OpenFailure.LIMIT: 503,
}

_FAILURE_TEXT = {
    OpenFailure.REFUSED: "connection refused",
    OpenFailure.DNS: "DNS lookup failed",
    OpenFailure.TIMEOUT: "connection timed out",
    OpenFailure.DENIED: "denied by the server's egress policy",
    OpenFailure.LIMIT: "too many streams, try again later",
    OpenFailure.UNREACHABLE: "network unreachable",
    OpenFailure.TUNNEL_DOWN: "the tunnel to the fluidity server is down",
    OpenFailure.LINK_LOST: "the tunnel link was lost",
    OpenFailure.RESET: "connection reset",
    OpenFailure.ERROR: "error",
}


def failure_status(failure: OpenFailure) -> int:
    """HTTP status for a stream failure: 403 denied, 504 timeout, 503 tunnel down or limit, else
    502."""
    return _FAILURE_STATUS.get(failure, 502)


def failure_text(target: str, failure: OpenFailure, detail: str) -> str:
    """One line explaining a stream failure, e.g. ``fluidity: cannot reach h:80: connection
    refused``; ``detail`` (the opener's message) is appended when it adds something."""
    summary = _FAILURE_TEXT[failure]
    detail = " ".join(detail.split())[:200]
    if detail and detail.lower() != summary.lower():
        summary = f"{summary} ({detail})"
    return f"fluidity: cannot reach {target}: {summary}\n"


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (empty when unknown)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HeadScanner:
    """Enforces request-head limits on raw bytes as they arrive, before the parser sees them.

    The parser checks a head only once it is complete (and keeps a partial header field whole
    until then); this tells an over-long request line (414) from too many
    or too large headers (431) and stops reading as soon as a limit is crossed. It follows line
    boundaries only and stops looking once the blank line ending the head has been seen; llhttp
    stays the parser. Memory: a few integers.
    """

    __slots__ = ("_done", "_headers", "_limits", "_line_len", "_request_line_done", "_total")

    def __init__(self, max_request_line: int, max_headers: int, max_header_bytes: int) -> None:
        self._limits = (max_request_line, max_headers, max_header_bytes)
        self.reset()

    def reset(self) -> None:
        """Start scanning a new request head."""
        self._total = 0
        self._line_len = 0
        self._headers = 0
        self._request_line_done = False
        self._done = False

    @property
    def started(self) -> bool:
        """True once any byte of the current head has been seen."""
        return self._total > 0

    def feed(self, data: bytes) -> BadRequestError | None:
        """Scan the next bytes received; return the 414/431 error if a limit is now crossed."""
        if self._done:
            return None
        max_request_line, max_headers, max_header_bytes = self._limits
        pos, size = 0, len(data)
        while pos < size:
            newline = data.find(b"\n", pos)
            end = size if newline < 0 else newline + 1
            self._line_len += end - pos
            self._total += end - pos
            pos = end
            if newline < 0:
                break
            # A complete line; <= 2 bytes means an empty one (b"\n" or b"\r\n").
            empty = self._line_len <= 2
            if not self._request_line_done:
                if self._line_len > max_request_line:
                    return BadRequestError(414, "request line too long")
                self._request_line_done = True
            elif empty:
                self._done = True
                return None
            else:
                self._headers += 1
                if self._headers > max_headers:
                    return BadRequestError(431, f"more than {max_headers} header fields")
            self._line_len = 0
            if self._total > max_header_bytes:
                return BadRequestError(431, "request header section too large")
        if not self._request_line_done and self._line_len > max_request_line:
            return BadRequestError(414, "request line too long")
        if self._total > max_header_bytes:
            return BadRequestError(431, "request header section too large")
        return None
