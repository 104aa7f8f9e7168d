"""Keep-alive proxy requests served by event-loop callbacks alone, handing anything else over.

Most requests a forward proxy sees are body-less ``GET``/``HEAD`` requests on a keep-alive
connection. Served by a :class:`~fluidity.agent.http_session.ClientSession`, each one costs task
wake-ups on both sides (client reads, stream reads, drains), an asyncio stream reader and writer
and the futures they wait on: profiles put about half of the agent's CPU per request there. A
:class:`RequestRelay` is the client transport's protocol and the upstream stream's consumer at
once (as :class:`~fluidity.agent.connect_tunnel.ConnectTunnel` is for CONNECT), parsing with the
same readers and applying the same rules (:mod:`.http_messages`), so a request costs what its
bytes cost.

It serves only what it can finish in callbacks: an absolute-form request without a body, with an
idempotent method (so a stale reused upstream can be replaced and the request replayed), no
upgrade, a head no longer than the request-line and header limits, to a target other than the
proxy, while the proxy has no authorizer and a link is up (the opener's ``open_now``). On the
first request that is anything else (a body, CONNECT, an upgrade, origin form, no link) the
relay hands the connection, with the bytes of that request, to the session through the
``hand_over`` callback, between two requests and never mid-exchange; the session then serves the
connection to its end. :func:`serve_requests_now` takes a connection only if its first request
qualifies.

Behaviour is the session's: the same request and response headers, re-framing for the client,
the stale-upstream retry, the same error answers and log lines, pipelined requests answered in
order, ``idle_timeout`` between requests and ``header_read_timeout`` for a head under way (408).
Memory per connection: the client bytes not yet answered (reading pauses above ``read_chunk``),
the client write buffer (``read_chunk``) and one stream window, withheld while the client reads
slowly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fluidity.agent.http_codec import (
    CLOSED,
    END,
    LAST_CHUNK,
    NEED_DATA,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    request_head,
)
from fluidity.agent.http_exchange import answer, client_head, interim_head
from fluidity.agent.http_messages import (
    IDEMPOTENT_METHODS,
    BadRequestError,
    Target,
    failure_status,
    failure_text,
    parse_absolute_target,
    request_body_framing,
    upgrade_protocols,
    upstream_request_headers,
)
from fluidity.agent.streams import OpenFailure, PushStream, StreamOpenError

if TYPE_CHECKING:
    from fluidity.agent.http_proxy import HttpProxy

logger = logging.getLogger("fluidity.agent.http")

#: Gives the connection to the task-based session: transport, bytes not yet served, client EOF.
HandOver = Callable[[asyncio.Transport, bytes, bool], None]

_HEAD_END = b"\r\n\r\n"


def serve_requests_now(
    proxy: HttpProxy, transport: asyncio.Transport, first: bytes, hand_over: HandOver
) -> bool:
    """Serve the connection with a :class:`RequestRelay` if ``first`` (its first read) starts
    with a request the relay serves; return whether it was taken. When not, nothing has
    happened: hand ``first`` to the session."""
    if (
        proxy.authorizer is not None
        or not proxy.admits_another()
        or getattr(proxy.opener, "open_now", None) is None
        or not 65 <= first[0] <= 90  # an upper-case method name; SOCKS5 starts with 0x05
        or _HEAD_END not in first
    ):
        return False
    relay = RequestRelay(proxy, transport, hand_over)
    if not relay.start(first):
        return False
    proxy.adopt_connection(relay)
    transport.set_protocol(relay)
    transport.set_write_buffer_limits(high=proxy.limits.read_chunk)
    return True


class RequestRelay(asyncio.Protocol):
    """A client connection's protocol that relays its requests to upstream streams.

    One request is served at a time; bytes of later requests wait unparsed in ``_pending``
    (reading stops while it holds more than ``read_chunk``). The upstream stream is kept between
    requests and reused for the next request to the same ``host:port`` when the origin left it
    reusable.
    """

    __slots__ = (
        "_attempt",
        "_busy",
        "_chunked_out",
        "_client_ended",
        "_deadline",
        "_hand_over",
        "_head_limit",
        "_head_request",
        "_head_sent",
        "_http_11",
        "_keep_alive",
        "_limits",
        "_loop",
        "_opened",
        "_outbound",
        "_pending",
        "_proxy",
        "_read_paused",
        "_received",
        "_requests",
        "_responses",
        "_reused",
        "_target",
        "_timer",
        "_transport",
        "_upstream",
        "_upstream_key",
        "_withheld",
        "_write_paused",
        "closed",
    )

    def __init__(self, proxy: HttpProxy, transport: asyncio.Transport, hand_over: HandOver) -> None:
        self._proxy = proxy
        self._limits = limits = proxy.limits
        self._transport = transport
        self._hand_over = hand_over
        self._loop = asyncio.get_running_loop()
        self._requests = RequestReader(
            limits.max_request_line, limits.max_headers, limits.max_header_bytes
        )
        # A head this long may cross the request-line or header limits: the session, which
        # checks them line by line, serves it.
        self._head_limit = min(limits.max_request_line, limits.max_header_bytes)
        self._pending = b""
        self._upstream: PushStream | None = None
        self._upstream_key: tuple[str, int] | None = None
        self._responses = ResponseReader(limits.max_response_header_bytes)
        # The exchange under way: its target, request head (kept for a replay), the client's
        # wishes, and how far the response has got.
        self._busy = False
        self._target: Target | None = None
        self._outbound = b""
        self._head_request = self._http_11 = self._keep_alive = False
        self._attempt = 0
        self._reused = self._opened = self._received = False
        self._head_sent = self._chunked_out = False
        self._client_ended = False
        self._read_paused = self._write_paused = False
        self._withheld = 0  # stream bytes written to the client whose window is held back
        # One timer, moved lazily: it fires at the first deadline set and re-arms itself if
        # the deadline moved later meanwhile (no timer handle per request).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self, first: bytes) -> bool:
        """Begin with the connection's first read; False (and nothing done) if its first
        request is not one the relay serves."""
        end = first.find(_HEAD_END) + len(_HEAD_END)
        if not self._begin_exchange(first[:end]):
            return False
        self._pending = first[end:]
        return True

    def abort(self) -> None:
        """Cut the connection now (the proxy is shutting down)."""
        self._drop_upstream()
        self._transport.abort()

    # --- the client's transport ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol() on a connected transport: start() has taken over

    def data_received(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data
        if self._busy or self._write_paused:
            if len(self._pending) > self._limits.read_chunk and not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._serve_pending()

    def eof_received(self) -> bool:
        self._client_ended = True
        if not self._busy and not self._write_paused:
            self._serve_pending()
        return True  # the transport stays open for the answer under way

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._busy = False
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_upstream()
        self._proxy.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        withheld, self._withheld = self._withheld, 0
        upstream = self._upstream
        if withheld and upstream is not None:
            upstream.release(withheld)
        if not self._busy and not self.closed:
            self._serve_pending()

    # --- requests --------------------------------------------------------------------------------

    def _serve_pending(self) -> None:
        """Start the next request if its head is complete; otherwise wait for it, within the
        time limits, or end the connection when the client has."""
        pending = self._pending
        if self.closed or self._transport.is_closing():
            return
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        end = pending.find(_HEAD_END)
        if end >= 0:
            end += len(_HEAD_END)
            if self._begin_exchange(pending[:end]):
                self._pending = pending[end:]
                self._deadline = None
            else:
                self._give_to_session()
            return
        if self._client_ended:
            if pending:
                self._give_to_session()  # it answers a head cut short as it always does
            else:
                self._transport.close()
            return
        if len(pending) > self._head_limit:
            self._give_to_session()  # it tells which limit was crossed (414 or 431)
            return
        now = self._loop.time()
        if self._deadline is None:
            self._set_deadline(now + self._limits.idle_timeout)
        if pending:
            self._set_deadline(min(self._deadline or now, now + self._limits.header_read_timeout))

    def _begin_exchange(self, head_bytes: bytes) -> bool:
        """Parse one complete head and send it upstream; False if the session must serve it
        (then nothing has been sent, and the connection goes to the session)."""
        proxy = self._proxy
        requests = self._requests
        if proxy.authorizer is not None or len(head_bytes) > self._head_limit:
            return False
        try:
            requests.receive_data(head_bytes)
            request = requests.next_event()
            if type(request) is not RequestHead or requests.next_event() is not END:
                return False
            framing = request_body_framing(request.headers)
            if (
                request.method not in IDEMPOTENT_METHODS
                or framing not in (None, 0)
                or upgrade_protocols(request.headers) is not None
            ):
                return False
            # Origin form (for the proxy itself) raises here too: the session answers it.
            target = parse_absolute_target(request.method, request.target)
        except (ProtocolError, BadRequestError):
            return False
        if proxy.is_own_address(target.host, target.port):
            return False
        upstream = self._upstream
        reused = upstream is not None and self._upstream_key == target.key
        reused = reused and self._responses.clean_for_reuse()
        if not reused:
            self._drop_upstream()
            upstream = self._open(target)
            if upstream is None:
                return False  # no link up now: the session waits for one
        headers = upstream_request_headers(
            request.raw_headers,
            authority=target.authority,
            body_framing=framing,
            upgrade=None,
            lowered=request.headers,
        )
        requests.start_next_cycle()
        proxy.requests += 1
        self._busy = True
        self._target = target
        self._outbound = request_head(request.method, target.path, headers)
        self._head_request = request.method == b"HEAD"
        self._http_11 = request.http_version == "1.1"
        self._keep_alive = request.keep_alive and self._http_11
        self._attempt = 1
        self._send_request(reused)
        return True

    def _open(self, target: Target) -> PushStream | None:
        stream: PushStream | None = self._proxy.opener.open_now(  # type: ignore[attr-defined]
            target.host, target.port
        )
        if stream is not None:
            self._upstream = stream
            self._upstream_key = target.key
            self._responses = ResponseReader(self._limits.max_response_header_bytes)
            stream.push_to(self)
        return stream

    def _send_request(self, reused: bool) -> None:
        upstream = self._upstream
        assert upstream is not None
        self._reused = reused
        self._opened = reused
        self._received = self._head_sent = self._chunked_out = False
        self._responses.expect_response(head_only=self._head_request)
        # Written before the open result arrives: over the tunnel this saves a round trip.
        upstream.write(self._outbound)

    def _give_to_session(self) -> None:
        """Hand the connection (and the bytes not served yet) to the task-based session."""
        self.closed = True
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_upstream()
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        self._proxy.connection_closed(self)
        pending, self._pending = self._pending, b""
        self._hand_over(self._transport, pending, self._client_ended)

    # --- the upstream stream (StreamConsumer) ----------------------------------------------------

    def stream_open(self) -> None:
        self._opened = True

    def stream_data(self, data: memoryview) -> None:
        upstream = self._upstream
        if not self._busy or upstream is None:
            # Bytes the origin sent with no request outstanding: the connection is unusable.
            self._drop_upstream()
            return
        self._received = True
        self._responses.receive_data(bytes(data))
        self._relay_response()
        if self._upstream is not upstream:
            return  # dropped (or replaced): its window does not matter any more
        if self._write_paused:
            self._withheld += len(data)
        else:
            upstream.release(len(data))

    def stream_eof(self) -> None:
        if not self._busy:
            self._drop_upstream()  # the origin closed an idle connection
            return
        if not self._received:
            text = f"fluidity: {self._display()} closed the connection, no response\n"
            self._upstream_failed(502, text, stale=True)
            return
        self._responses.receive_eof()
        self._relay_response()

    def stream_error(self, error: StreamOpenError) -> None:
        self._drop_upstream()  # finished already: this only forgets it
        if not self._busy:
            return
        target = self._display()
        if not self._opened:
            # Opening failed: counted and logged as the session does.
            self._proxy.open_failures += 1
            logger.info("http.open_failed target=%s reason=%s", target, error.failure.value)
            self._answer_error(
                failure_status(error.failure), failure_text(target, error.failure, error.message)
            )
            return
        text = failure_text(target, error.failure, error.message)
        self._upstream_failed(failure_status(error.failure), text, stale=not self._received)

    # --- responses -------------------------------------------------------------------------------

    def _relay_response(self) -> None:
        """Pass on every response event parsed so far, in one write to the client."""
        reader = self._responses
        out: list[bytes] = []
        while True:
            try:
                event = reader.next_event()
            except ProtocolError as exc:
                self._transport.writelines(out)
                self._invalid_response(exc)
                return
            if type(event) is bytes:
                if event:
                    if self._chunked_out:
                        out += chunk(event)
                    else:
                        out.append(event)
            elif event is NEED_DATA:
                if out:
                    self._transport.writelines(out)
                return
            elif type(event) is ResponseHead:
                head = self._response_head(event)
                if head is None:
                    self._transport.writelines(out)
                    self._invalid_response(ProtocolError("101 without an upgrade request"))
                    return
                out.append(head)
            elif event is END:
                if self._chunked_out:
                    out.append(LAST_CHUNK)
                self._transport.writelines(out)
                self._end_exchange()
                return
            else:  # CLOSED: the origin closed before a response began
                assert event is CLOSED
                self._transport.writelines(out)
                text = f"fluidity: {self._display()} closed the connection, no response\n"
                self._upstream_failed(502, text, stale=False)
                return

    def _response_head(self, event: ResponseHead) -> bytes | None:
        """The head to send the client for ``event`` (empty for a 1xx an HTTP/1.0 client does
        not get); ``None`` for a 101, which was not asked for."""
        if event.status < 200:
            if event.status == 101:
                return None
            return interim_head(event) if self._http_11 else b""
        head, self._chunked_out, self._keep_alive = client_head(
            event,
            http_11=self._http_11,
            head_request=self._head_request,
            keep_alive=self._keep_alive,
        )
        self._head_sent = True
        return head

    def _end_exchange(self) -> None:
        """The response went out whole: keep the upstream if reusable, then the next request."""
        self._busy = False
        if not self._responses.clean_for_reuse():
            self._drop_upstream()
        if not self._keep_alive:
            self._transport.close()
            return
        if not self._write_paused:
            self._serve_pending()

    def _invalid_response(self, exc: ProtocolError) -> None:
        text = f"fluidity: invalid response from {self._display()}\n"
        if exc.status == 502:  # a limit of ours, e.g. a head too large
            text = f"fluidity: invalid response from {self._display()}: {exc.reason}\n"
        self._upstream_failed(502, text, stale=False)

    def _upstream_failed(self, status: int, text: str, *, stale: bool) -> None:
        """The origin side failed: replay on a fresh stream if a reused one was stale, answer
        the error if no response head went out yet, else cut the client connection."""
        self._drop_upstream()
        target = self._target
        assert target is not None
        if self._head_sent:
            self._busy = False
            self._transport.close()  # the response is cut short: closing is all that is left
            return
        if stale and self._reused and self._attempt == 1:
            self._attempt = 2
            if self._open(target) is not None:
                self._send_request(reused=False)
                return
            status, text = 503, failure_text(target.display, OpenFailure.TUNNEL_DOWN, "")
        logger.debug("http.upstream_failed target=%s status=%d", target.display, status)
        self._answer_error(status, text)

    def _answer_error(self, status: int, text: str) -> None:
        """Answer the current request with a plain-text error, as the session words them."""
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        pieces = answer(
            status,
            headers,
            text.encode(),
            close=not self._keep_alive,
            head_request=self._head_request,
        )
        self._transport.writelines(pieces)
        self._busy = False
        if not self._keep_alive:
            self._transport.close()
        elif not self._write_paused:
            self._serve_pending()

    # --- helpers ---------------------------------------------------------------------------------

    def _display(self) -> str:
        return self._target.display if self._target is not None else "?"

    def _drop_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        self._upstream_key = None
        self._withheld = 0  # window of a stream that is gone
        if upstream is not None:
            upstream.push_to(None)
            upstream.close()

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.closed:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        # Idle too long between requests (closed silently), or a head did not complete in time.
        if self._pending:
            self._keep_alive = False
            self._head_request = False
            self._answer_error(408, "fluidity: request head not received in time\n")
        else:
            self._transport.close()
