"""One client connection of the HTTP proxy: parse requests, forward them over streams.

Requests on a connection are served one at a time (pipelined requests wait, parsed, in the
reader's queue). Bodies are streamed in both directions, chunk by chunk with a drain after each,
never buffered whole. The upstream stream is kept between requests and reused when the next
request goes to the same ``host:port`` and the origin left the connection reusable.

Keep-alive choice: the client connection stays open after a response whenever the response could
be framed for the client and the client did not ask to close, even if the origin closed its side
(a read-until-close origin response is re-framed as chunked for HTTP/1.1 clients). HTTP/1.0
clients get one response per connection. After CONNECT or a protocol upgrade the connection is
raw bytes until both directions end, then it is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fluidity.agent.connect_tunnel import CONNECT_OK
from fluidity.agent.http_codec import (
    END,
    NEED_DATA,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    request_head,
    response_head,
)
from fluidity.agent.http_exchange import (
    AbortExchangeError,
    ClientSide,
    Upstream,
    UpstreamError,
    answer,
    exchange,
)
from fluidity.agent.http_messages import (
    CHUNKED,
    IDEMPOTENT_METHODS,
    BadRequestError,
    HeadScanner,
    LocalRequest,
    LocalResponse,
    Target,
    downstream_response_headers,
    failure_status,
    failure_text,
    parse_absolute_target,
    parse_connect_target,
    request_body_framing,
    upgrade_protocols,
    upstream_request_headers,
)
from fluidity.agent.pipe import pipe, reset_connection
from fluidity.agent.streams import StreamOpenError

if TYPE_CHECKING:
    from fluidity.agent.http_proxy import HttpProxy

logger = logging.getLogger("fluidity.agent.http")

_NOT_A_PROXY_REQUEST = "this is a proxy: send absolute-form requests (http://host/path) or CONNECT"
#: After refusing a request, unread input is drained for at most this long / this many bytes so
#: that closing does not reset the connection before the client has read the answer.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024


class ClientSession:
    """Serves one client connection of :class:`~fluidity.agent.http_proxy.HttpProxy`."""

    def __init__(
        self, proxy: HttpProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._limits = limits = proxy.limits
        self._reader = reader
        self._writer = writer
        self._requests = RequestReader(
            limits.max_request_line, limits.max_headers, limits.max_header_bytes
        )
        self._scanner = _head_scanner(proxy)
        self._upstream: Upstream | None = None
        self._method = b""
        self._linger = False
        # The current request, as far as answering it goes: its body was read to the end; the
        # client may send another request; a response to it has started going out.
        self._request_read = False
        self._in_body = False
        self._keep_alive = False
        self._responded = False

    async def run(self) -> None:
        """Serve requests until the client leaves, an error closes the connection, or cancel."""
        try:
            first = True
            while await self._serve_one(first):
                first = False
                self._requests.start_next_cycle()
            if self._linger:
                await self._linger_close()
        except (OSError, AbortExchangeError, StreamOpenError, ProtocolError, TimeoutError):
            pass  # the client or the origin went away mid-exchange: closing is all that is left
        except Exception:
            logger.exception("http.internal_error")
        finally:
            self._drop_upstream()
            self._writer.close()

    async def _serve_one(self, first: bool) -> bool:
        """Read and answer one request; return True if the connection can carry another."""
        self._method = b""
        self._request_read = self._in_body = self._keep_alive = self._responded = False
        request = await self._read_request(first)
        if request is None:
            return False
        self._proxy.requests += 1
        self._method = request.method
        self._keep_alive = request.keep_alive and request.http_version == "1.1"
        try:
            framing = request_body_framing(request.headers)
            has_body = framing is not None and framing != 0
            if has_body:
                self._in_body = True
            else:
                self._next_client_event()  # the end of a body-less request
            if request.method == b"CONNECT":
                if has_body:
                    raise BadRequestError(400, "CONNECT request with a body")
                if (refusal := self._check_access(request)) is not None:
                    return self._send_local(refusal)
                target = parse_connect_target(request.target)
                # This frame lives as long as the tunnel: without the head, an open tunnel
                # holds about 300 bytes less (its header list and strings).
                del request
                await self._tunnel(target)
                return False
            if request.target.startswith(b"/") or request.target == b"*":
                return await self._answer_locally(request)
            target = parse_absolute_target(request.method, request.target)
        except BadRequestError as bad:
            self._refuse(bad)
            return False
        if self._proxy.is_own_address(target.host, target.port):
            return await self._answer_locally(request)
        if (refusal := self._check_access(request)) is not None:
            return self._send_local(refusal)
        return await self._forward(request, target, framing)

    # -- reading request heads ---------------------------------------------------------------

    async def _read_request(self, first: bool) -> RequestHead | None:
        loop = asyncio.get_running_loop()
        limits = self._limits
        requests = self._requests
        scanner = self._scanner
        scanner.reset()
        wait = limits.header_read_timeout if first else limits.idle_timeout
        deadline = loop.time() + wait
        if requests.started:
            # Bytes pipelined behind the previous request are the start of this head.
            deadline = min(deadline, loop.time() + limits.header_read_timeout)
        while True:
            try:
                event = requests.next_event()
            except ProtocolError as exc:
                status = exc.status if exc.status in (414, 431) else 400
                self._refuse(BadRequestError(status, exc.reason))
                return None
            if event is NEED_DATA:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self._reader.read(limits.read_chunk)
                except TimeoutError:
                    if scanner.started or requests.started:
                        self._send_error(408, "fluidity: request head not received in time\n")
                    return None
                if not data:
                    requests.receive_eof()
                    continue
                if not scanner.started:
                    deadline = min(deadline, loop.time() + limits.header_read_timeout)
                problem = scanner.feed(data)
                if problem is not None:
                    self._refuse(problem)
                    return None
                requests.receive_data(data)
                continue
            if type(event) is RequestHead:
                if len(event.method) + len(event.target) + 12 > limits.max_request_line:
                    self._refuse(BadRequestError(414, "request line too long"))
                    return None
                return event
            return None  # CLOSED (or a stray event after an error)

    def _next_client_event(self) -> None:
        if self._requests.next_event() is not END:
            raise AbortExchangeError
        self._request_read = True
        self._in_body = False

    # -- plain requests ----------------------------------------------------------------------

    async def _forward(self, request: RequestHead, target: Target, framing: int | None) -> bool:
        has_body = framing is not None and framing != 0
        upgrade = None if has_body else upgrade_protocols(request.headers)
        headers = upstream_request_headers(
            request.raw_headers,
            authority=target.authority,
            body_framing=framing,
            upgrade=upgrade,
            lowered=request.headers,
        )
        outbound = request_head(request.method, target.path, headers)
        head_request = request.method == b"HEAD"
        client = ClientSide(
            self._requests,
            self._reader,
            self._writer,
            http_11=request.http_version == "1.1",
            keep_alive=self._keep_alive,
            head_request=head_request,
        )
        # A reused connection may have been closed by the origin while idle; a request that can
        # be replayed (no body, idempotent) is retried once on a fresh stream.
        replayable = not has_body and request.method in IDEMPOTENT_METHODS
        for attempt in (1, 2):
            upstream = self._upstream
            reused = upstream is not None and upstream.reusable_for(target.key)
            if upstream is None or not reused:
                self._drop_upstream()
                try:
                    stream = await self._proxy.opener.open(target.host, target.port)
                except StreamOpenError as exc:
                    return self._report_failure(target, exc, opening=True)
                reader = ResponseReader(self._limits.max_response_header_bytes)
                upstream = self._upstream = Upstream(target.key, target.display, stream, reader)
            upstream.reader.expect_response(head_only=head_request)
            # The head is written before the open result arrives: over the tunnel this saves
            # a round trip, and the stream queues it until it is open.
            upstream.stream.write(outbound)
            try:
                await upstream.stream.wait_open()
                result = await exchange(
                    upstream,
                    client,
                    body_chunked=(framing == CHUNKED) if has_body else None,
                    upgrade=upgrade is not None,
                    read_chunk=self._limits.read_chunk,
                    body_timeout=self._limits.idle_timeout,
                )
            except StreamOpenError as exc:  # from wait_open
                self._drop_upstream()
                return self._report_failure(target, exc, opening=not reused)
            except UpstreamError as exc:
                self._drop_upstream()
                if exc.stale and reused and replayable and attempt == 1:
                    continue
                logger.debug("http.upstream_failed target=%s status=%d", target.display, exc.status)
                return self._send_error(exc.status, exc.text)
            self._responded = True
            if result.switch is not None:
                await self._switch_protocols(upstream, result.switch)
                return False
            if not upstream.reusable_for(target.key):
                self._drop_upstream()
            if has_body and result.request_read:
                self._request_read = True
                self._in_body = False
            if not self._request_read:
                self._linger = True  # early response: the rest of the body was not read
                return False
            return result.client_reusable
        raise AssertionError("unreachable")

    async def _switch_protocols(self, upstream: Upstream, event: ResponseHead) -> None:
        """Relay the origin's 101 and carry raw bytes both ways until both sides end."""
        headers = downstream_response_headers(event.raw_headers, upgrade=True)
        self._writer.write(response_head(101, event.reason, headers))
        client_bytes, client_eof = self._requests.trailing_data
        origin_bytes, _ = upstream.reader.trailing_data
        if origin_bytes:
            self._writer.write(origin_bytes)
        if client_bytes:
            upstream.stream.write(client_bytes)
        result = await pipe(
            self._reader,
            self._writer,
            upstream.stream,
            read_chunk=self._limits.read_chunk,
            client_eof=client_eof,
        )
        self._drop_upstream()
        self._abort_unless_clean(result.clean)

    # -- CONNECT -----------------------------------------------------------------------------

    async def _tunnel(self, target: Target) -> None:
        self._drop_upstream()
        try:
            stream = await self._proxy.opener.open(target.host, target.port)
        except StreamOpenError as exc:
            self._report_failure(target, exc, opening=True, close=True)
            return
        try:
            try:
                await stream.wait_open()
            except StreamOpenError as exc:
                self._report_failure(target, exc, opening=True, close=True)
                return
            self._writer.write(CONNECT_OK)
            self._responded = True
            early, client_eof = self._requests.trailing_data
            if early:
                stream.write(early)
            result = await pipe(
                self._reader,
                self._writer,
                stream,
                read_chunk=self._limits.read_chunk,
                client_eof=client_eof,
            )
            self._abort_unless_clean(result.clean)
        finally:
            stream.close()

    def _abort_unless_clean(self, clean: bool) -> None:
        """End a raw tunnel that failed (link lost, stream reset) with an RST, not a FIN.

        A raw byte stream has no framing of its own, so a FIN would tell the client that the
        data ended normally; the reset tells it the data was cut short.
        """
        if not clean:
            reset_connection(self._writer.transport)

    # -- answers from the proxy itself -------------------------------------------------------

    async def _answer_locally(self, request: RequestHead) -> bool:
        handler = self._proxy.local_handler
        if handler is None:
            return self._send_error(400, f"fluidity: {_NOT_A_PROXY_REQUEST}\n")
        local = LocalRequest(
            method=request.method.decode("ascii", "replace"),
            target=request.target.decode("ascii", "replace"),
            headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers),
        )
        return self._send_local(await handler(local))

    def _check_access(self, request: RequestHead) -> LocalResponse | None:
        """The proxy's authorizer's answer: ``None`` to serve the request, else the refusal."""
        authorizer = self._proxy.authorizer
        return None if authorizer is None else authorizer(request.headers)

    def _send_local(self, answer: LocalResponse) -> bool:
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in answer.headers]
        headers.append((b"Content-Type", answer.content_type.encode("latin-1")))
        return self._respond(answer.status, headers, answer.body)

    def _report_failure(
        self, target: Target, exc: StreamOpenError, *, opening: bool, close: bool = False
    ) -> bool:
        if opening:
            self._proxy.open_failures += 1
            logger.info("http.open_failed target=%s reason=%s", target.display, exc.failure.value)
        text = failure_text(target.display, exc.failure, exc.message)
        return self._send_error(failure_status(exc.failure), text, close=close)

    def _refuse(self, bad: BadRequestError) -> None:
        """Answer a request that cannot be served, then close (draining unread input first)."""
        logger.debug("http.bad_request status=%d reason=%s", bad.status, bad.reason)
        self._send_error(bad.status, f"fluidity: {bad.reason}\n", close=True)
        self._linger = True

    def _send_error(self, status: int, text: str, *, close: bool = False) -> bool:
        """Send a plain-text answer; True if the connection can carry another request."""
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        return self._respond(status, headers, text.encode(), close=close)

    def _respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False
    ) -> bool:
        if self._responded:
            return False  # a response was already under way: closing says the rest
        self._responded = True
        # A request whose body was not read leaves bytes that are not a request head.
        close = close or not self._request_read or not self._keep_alive
        if self._in_body:
            self._linger = True
        head_request = self._method == b"HEAD"
        self._writer.writelines(
            answer(status, headers, body, close=close, head_request=head_request)
        )
        return not close

    # -- closing -----------------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.stream.close()

    async def _linger_close(self) -> None:
        """Half-close and discard what the client still sends, so the answer is not lost to RST."""
        writer, reader = self._writer, self._reader
        if writer.is_closing():
            return
        if writer.can_write_eof():
            writer.write_eof()
        discarded = 0
        async with asyncio.timeout(_LINGER_SECONDS):
            while discarded < _LINGER_BYTES:
                data = await reader.read(self._limits.read_chunk)
                if not data:
                    break
                discarded += len(data)


def _head_scanner(proxy: HttpProxy) -> HeadScanner:
    limits = proxy.limits
    return HeadScanner(limits.max_request_line, limits.max_headers, limits.max_header_bytes)
