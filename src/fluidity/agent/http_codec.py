"""HTTP/1.1 message reading and writing without I/O, on llhttp (through ``httptools``).

The agent's forward proxy parses every request from a client and every response from an origin.
Profiles showed h11, a pure-Python parser, taking over a third of the agent's time on small
requests, so the hot path parses with llhttp (Node's C parser, strict mode: bare LF, obs-fold,
invalid tokens, Content-Length with Transfer-Encoding and duplicate lengths are all refused) and
serialises heads by hand. The proxy rules themselves stay in :mod:`fluidity.agent.http_messages`.

Readers are fed bytes and hand out events one at a time, like h11: a head
(:class:`RequestHead` / :class:`ResponseHead`), body pieces as ``bytes``, :data:`END` when a
message is complete, :data:`NEED_DATA` when more input is needed and :data:`CLOSED` when the peer
closed between messages. llhttp parses everything it is given, so events of pipelined messages
queue up behind the current one; the queue is bounded by what the caller fed (one read).

Limits: a request head is checked against the request-line, header-count and header-byte limits
when it completes (the caller scans raw bytes while a head arrives, see
:class:`~fluidity.agent.http_messages.HeadScanner`); a response head is bounded by the bytes fed
before it completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import httptools

Header = tuple[bytes, bytes]


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: More bytes are needed before the next event.
NEED_DATA: Final = _Marker("NEED_DATA")
#: The current message is complete.
END: Final = _Marker("END")
#: The peer closed its side between messages.
CLOSED: Final = _Marker("CLOSED")

_OWS = b" \t"
#: llhttp also reads HTTP/0.9 request lines (no version) and any HTTP/1.x minor version.
_VERSIONS = frozenset({"1.0", "1.1"})


class ProtocolError(Exception):
    """The peer sent something that is not valid HTTP/1.1; ``status`` is the answer to give."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class RequestHead:
    """A request line and its header fields.

    ``raw_headers`` keep the client's name case (values without surrounding whitespace);
    ``headers`` are the same fields with lowercase names. ``upgrade`` is llhttp's view that bytes
    after this message are not HTTP (CONNECT, or Connection: upgrade with an Upgrade header).
    """

    method: bytes
    target: bytes
    http_version: str
    raw_headers: list[Header]
    headers: list[Header]
    keep_alive: bool
    upgrade: bool


@dataclass(slots=True)
class ResponseHead:
    """A status line and its header fields (see :class:`RequestHead` for the two header lists).

    ``chunked`` and ``content_length`` describe the body's framing on the wire; a response with
    neither (and a status that has a body) is delimited by the origin closing the connection.
    """

    status: int
    reason: bytes
    http_version: str
    raw_headers: list[Header]
    headers: list[Header]
    keep_alive: bool
    chunked: bool
    content_length: int | None


Event = RequestHead | ResponseHead | bytes | _Marker


class _LimitError(Exception):
    """Raised inside a parser callback to stop parsing when a limit is crossed."""


_ParserT = TypeVar("_ParserT", httptools.HttpRequestParser, httptools.HttpResponseParser)


class _Reader(Generic[_ParserT]):
    """What request and response readers share: the event queue, errors, upgrades and EOF."""

    __slots__ = (
        "_eof",
        "_error",
        "_events",
        "_headers",
        "_in_message",
        "_leftover",
        "_next",
        "_parser",
    )

    def __init__(self) -> None:
        # Pending events and the index of the next one: a list costs less than a deque's
        # 64-slot block, and thousands of connections each hold one.
        self._events: list[Event] = []
        self._next = 0
        self._error: ProtocolError | None = None
        self._eof = False
        self._in_message = False
        self._headers: list[Header] = []
        self._leftover = b""
        # None after an upgrade: llhttp is paused for good, and a tunnel held open for hours
        # should not keep it (a refused upgrade gets a fresh parser).
        self._parser: _ParserT | None = self._new_parser()

    def _new_parser(self) -> _ParserT:
        raise NotImplementedError

    # -- feeding -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Parse ``data`` (never empty: use :meth:`receive_eof` for the end of input)."""
        if self._error is not None:
            return
        parser = self._parser
        if parser is None:
            # After an upgrade the bytes are not HTTP; they wait for whoever takes them over
            # (or for the next cycle, if the upgrade was refused).
            self._leftover += data
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._parser = None
            self._leftover = data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            limit = exc.__context__
            if isinstance(limit, ProtocolError):
                self._error = limit
            elif isinstance(limit, _LimitError):
                self._error = ProtocolError(str(limit), 431)
            else:
                raise
        except httptools.HttpParserError as exc:
            self._error = ProtocolError(f"malformed message: {exc}"[:200])

    def receive_eof(self) -> None:
        """The peer closed its side: no more bytes will come."""
        self._eof = True

    # -- consuming ---------------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event; raises :class:`ProtocolError` once the events before a fault are out."""
        events = self._events
        if self._next < len(events):
            event = events[self._next]
            self._next += 1
            if self._next == len(events):
                events.clear()
                self._next = 0
            return event
        if self._error is not None:
            raise self._error
        if self._eof:
            return self._end_of_input()
        return NEED_DATA

    def _end_of_input(self) -> Event:
        if self._in_message:
            raise ProtocolError("connection closed in the middle of a message")
        return CLOSED

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received after an upgrade (not HTTP) and whether the peer has closed.

        Empty unless llhttp stopped at an upgrade: otherwise every byte fed has been parsed.
        """
        return self._leftover, self._eof

    def start_next_cycle(self) -> None:
        """After a message exchange that did not switch protocols: parse what follows as HTTP."""
        if self._parser is None:
            leftover, self._leftover = self._leftover, b""
            self._parser = self._new_parser()
            if leftover:
                self.receive_data(leftover)

    @property
    def started(self) -> bool:
        """True if a message is under way or events are queued (pipelined input)."""
        return self._in_message or self._next < len(self._events)

    @property
    def idle(self) -> bool:
        """True if no message is under way and no event of a later message is queued."""
        return not self._in_message and self._next == len(self._events) and self._error is None

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value.strip(_OWS)))

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(END)


class RequestReader(_Reader[httptools.HttpRequestParser]):
    """Reads the requests a client sends, checking each head against the proxy's limits.

    ``max_request_line`` bounds the method and target (bytes; 414 above), ``max_headers`` the
    number of header fields and ``max_header_bytes`` their total size (431 above).
    """

    __slots__ = ("_limits", "_target", "_target_len")

    def __init__(self, max_request_line: int, max_headers: int, max_header_bytes: int) -> None:
        self._limits = (max_request_line, max_headers, max_header_bytes)
        self._target: list[bytes] = []
        self._target_len = 0
        super().__init__()

    def _new_parser(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._in_message = True
        self._target = []
        self._target_len = 0
        self._headers = []

    def on_url(self, piece: bytes) -> None:
        self._target.append(piece)
        self._target_len += len(piece)
        if self._target_len > self._limits[0]:
            raise ProtocolError("request line too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value.strip(_OWS)))
        if len(headers) > self._limits[1]:
            raise _LimitError(f"more than {self._limits[1]} header fields")

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # a callback runs inside feed_data
        raw = self._headers
        size = sum(len(name) + len(value) + 4 for name, value in raw)
        if size > self._limits[2]:
            raise _LimitError("request header section too large")
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise ProtocolError(f"HTTP version {version[:8]} is not supported: use HTTP/1.1")
        self._events.append(
            RequestHead(
                method=parser.get_method(),
                target=b"".join(self._target),
                http_version=version,
                raw_headers=raw,
                headers=[(name.lower(), value) for name, value in raw],
                keep_alive=parser.should_keep_alive(),
                upgrade=parser.should_upgrade(),
            )
        )


class ResponseReader(_Reader[httptools.HttpResponseParser]):
    """Reads an origin's responses to the requests sent to it, one exchange at a time.

    Call :meth:`expect_response` before each request is sent, saying whether it was a HEAD (whose
    response has no body whatever its headers say). ``max_head_bytes`` bounds the bytes received
    before a final response head completes (502 above).
    """

    __slots__ = (
        "_awaiting_head",
        "_head_budget",
        "_head_only",
        "_last_head",
        "_max_head_bytes",
        "_reason",
        "_skipping",
        "stray",
    )

    def __init__(self, max_head_bytes: int) -> None:
        self._max_head_bytes = max_head_bytes
        self._head_budget = max_head_bytes
        self._awaiting_head = True
        self._last_head: ResponseHead | None = None
        self._head_only = False
        self._skipping = False
        self._reason: list[bytes] = []
        #: True once the origin sent bytes it should not have (a body after a HEAD response):
        #: the connection must not be reused.
        self.stray = False
        super().__init__()

    def _new_parser(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self)

    def expect_response(self, *, head_only: bool) -> None:
        """Prepare for the response to the request about to be sent."""
        if self._head_only or self._skipping:
            # llhttp still waits for the body the HEAD response's headers announced.
            self._parser = self._new_parser()
            self._skipping = False
        self._head_only = head_only
        self._head_budget = self._max_head_bytes
        self._awaiting_head = True

    def receive_data(self, data: bytes) -> None:
        """Parse ``data`` from the origin (see :meth:`_Reader.receive_data`)."""
        if not self._awaiting_head:
            super().receive_data(data)
            return
        self._head_budget -= len(data)
        super().receive_data(data)
        if self._awaiting_head and self._head_budget < 0 and self._error is None:
            self._error = ProtocolError("response head too large", 502)

    def _end_of_input(self) -> Event:
        # llhttp cannot see the end of a body that runs until the connection closes.
        if self._in_message and self._reading_until_close():
            self._in_message = False
            return END
        return super()._end_of_input()

    def _reading_until_close(self) -> bool:
        head = self._last_head
        return head is not None and not head.chunked and head.content_length is None

    def on_message_begin(self) -> None:
        if self._skipping:
            self.stray = True
        self._in_message = True
        self._headers = []
        self._reason = []
        self._last_head = None

    def on_status(self, piece: bytes) -> None:
        self._reason.append(piece)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # a callback runs inside feed_data
        raw = self._headers
        headers = [(name.lower(), value) for name, value in raw]
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise ProtocolError(f"HTTP version {version[:8]} is not supported")
        chunked = False
        content_length = None
        for name, value in headers:
            if name == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip(_OWS).lower() == b"chunked"
            elif name == b"content-length":
                content_length = int(value)  # llhttp has checked it is one decimal number
        head = ResponseHead(
            status=status,
            reason=b"".join(self._reason),
            http_version=version,
            raw_headers=raw,
            headers=headers,
            keep_alive=parser.should_keep_alive(),
            chunked=chunked,
            content_length=content_length,
        )
        self._events.append(head)
        if status >= 200:
            self._awaiting_head = False
            self._last_head = head
            if self._head_only:
                # A HEAD response ends with its head; what llhttp would take as its body is
                # not expected at all.
                self._in_message = False
                self._skipping = True
                self._events.append(END)

    def on_body(self, body: bytes) -> None:
        if self._skipping:
            self.stray = True
        else:
            self._events.append(body)

    def on_message_complete(self) -> None:
        head = self._last_head
        if self._skipping:
            return
        if head is None:
            # An interim (1xx) response: its end is not an event, the final response follows.
            # A 101 is followed by an upgrade, which stops the parser.
            self._in_message = False
            return
        super().on_message_complete()

    def clean_for_reuse(self) -> bool:
        """True if another request can follow on this connection.

        A body that runs until the origin closes ends with EOF, which rules reuse out.
        """
        head = self._last_head
        return (
            self.idle
            and not self.stray
            and self._parser is not None
            and not self._eof
            and head is not None
            and head.keep_alive
        )


def request_head(method: bytes, target: bytes, headers: list[Header]) -> bytes:
    """Serialise an HTTP/1.1 request head (inputs already validated by llhttp or by the proxy)."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(status: int, reason: bytes, headers: list[Header]) -> bytes:
    """Serialise an HTTP/1.1 status line and header fields."""
    lines = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body as pieces for ``writelines`` (no copy of ``data``).

    ``data`` must not be empty: an empty chunk ends the body.
    """
    return (b"%x\r\n" % len(data), data, b"\r\n")


#: The last chunk of a chunked body, with no trailer fields.
LAST_CHUNK: Final = b"0\r\n\r\n"
