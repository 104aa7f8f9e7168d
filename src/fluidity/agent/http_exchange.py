"""One request/response exchange between a client connection and an upstream stream.

The request head is already on its way; this streams the request body to the origin while the
response comes back (so ``100 Continue`` and early answers work), relaying every response event to
the client, re-framed where the client needs it. Memory: one ``read_chunk`` from the client and
one stream read in flight, each followed by a drain before the next.

Framing towards the client: a body with a Content-Length is passed through as is; a chunked or
read-until-close body goes to an HTTP/1.1 client chunked, and to an HTTP/1.0 client delimited by
closing the connection. Trailer fields are dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fluidity.agent.http_codec import (
    CLOSED,
    END,
    LAST_CHUNK,
    NEED_DATA,
    ProtocolError,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    response_head,
)
from fluidity.agent.http_messages import (
    Header,
    downstream_response_headers,
    failure_status,
    failure_text,
    reason_phrase,
)
from fluidity.agent.streams import StreamOpenError, TunnelStream

_BODILESS_STATUSES = frozenset({204, 304})


def client_head(
    event: ResponseHead, *, http_11: bool, head_request: bool, keep_alive: bool
) -> tuple[bytes, bool, bool]:
    """The head to send the client for a final response ``event``; whether the body must go to
    the client chunked; whether the client connection stays reusable after it.

    A body without a Content-Length (chunked, or read until the origin closes) goes chunked to an
    HTTP/1.1 client and close-delimited to an HTTP/1.0 one. ``keep_alive``: the client allows
    another request.
    """
    headers = downstream_response_headers(event.raw_headers, upgrade=False, lowered=event.headers)
    bodiless = head_request or event.status in _BODILESS_STATUSES
    chunked_out = False
    if not bodiless and (event.chunked or event.content_length is None):
        if http_11:
            headers.append((b"Transfer-Encoding", b"chunked"))
            chunked_out = True
        else:
            keep_alive = False  # the end of the body is the end of the connection
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    return response_head(event.status, event.reason, headers), chunked_out, keep_alive


def interim_head(event: ResponseHead) -> bytes:
    """The head of a 1xx response (other than 101) as an HTTP/1.1 client gets it."""
    headers = downstream_response_headers(event.raw_headers, upgrade=False, lowered=event.headers)
    return response_head(event.status, event.reason, headers)


def answer(
    status: int, headers: list[Header], body: bytes, *, close: bool, head_request: bool
) -> tuple[bytes, ...]:
    """A whole answer from the proxy itself (an error, a local page), as pieces for
    ``writelines``; ``close`` adds ``Connection: close``, a HEAD request gets no body."""
    headers.append((b"Content-Length", str(len(body)).encode()))
    if close:
        headers.append((b"Connection", b"close"))
    head = response_head(status, reason_phrase(status), headers)
    return (head, body) if body and not head_request else (head,)


class AbortExchangeError(Exception):
    """The exchange broke after the response head went out: only closing the client is left."""


class UpstreamError(Exception):
    """The origin side failed before the response head went to the client; answer ``status``."""

    def __init__(self, status: int, text: str, *, stale: bool) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.stale = stale  # nothing at all came back (a reused connection the origin had closed)


@dataclass(slots=True)
class Upstream:
    """A stream to an origin and the reader of the responses that come back on it."""

    key: tuple[str, int]
    display: str  # host:port, for messages
    stream: TunnelStream
    reader: ResponseReader
    #: False while a request body is still being sent.
    request_sent: bool = True

    def reusable_for(self, key: tuple[str, int]) -> bool:
        """True if the next request to ``key`` can go over this connection."""
        return self.key == key and self.request_sent and self.reader.clean_for_reuse()


@dataclass(slots=True)
class ClientSide:
    """What the exchange needs to know about the client and its request."""

    reader: RequestReader
    stream_reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The client speaks HTTP/1.1 (an HTTP/1.0 client gets no chunked framing, no 1xx).
    http_11: bool
    #: The client may send another request after this one.
    keep_alive: bool
    #: The request was a HEAD: the response has no body whatever its headers say.
    head_request: bool


@dataclass(slots=True)
class ExchangeResult:
    """How an exchange ended."""

    #: The origin's ``101`` when an upgrade was requested and granted (not yet sent on).
    switch: ResponseHead | None = None
    #: The response went out complete and framed, and the client may send another request.
    client_reusable: bool = False
    #: The whole request body was read from the client (always True without a body).
    request_read: bool = True


async def exchange(
    upstream: Upstream,
    client: ClientSide,
    *,
    body_chunked: bool | None,
    upgrade: bool,
    read_chunk: int,
    body_timeout: float,
) -> ExchangeResult:
    """Relay the origin's response to the client, uploading the request body concurrently.

    ``body_chunked`` is ``None`` for a request without a body, else whether the body goes to the
    origin chunked (False: with its Content-Length). The request body may still be unread when
    the origin answered early (``request_read`` False). ``body_timeout`` (seconds) bounds each
    wait for request-body bytes. Raises :class:`UpstreamError`, :class:`AbortExchangeError`, or
    the client side's ``OSError`` / ``TimeoutError`` / :class:`ProtocolError`.
    """
    relay = _relay_response(upstream, client, upgrade=upgrade)
    if body_chunked is None:
        return await relay
    upstream.request_sent = False
    upload = asyncio.ensure_future(
        _upload(upstream, client, chunked=body_chunked, read_chunk=read_chunk, timeout=body_timeout)
    )
    response = asyncio.ensure_future(relay)
    try:
        pending: set[asyncio.Future[Any]] = {upload, response}
        while not response.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if upload in done and upload.exception() is not None:
                upload.result()  # the client side failed: raise its error
        result = response.result()
        result.request_read = upload.done() and not upload.cancelled() and upload.result()
        return result
    finally:
        upload.cancel()
        response.cancel()
        await asyncio.gather(upload, response, return_exceptions=True)


async def _upload(
    upstream: Upstream, client: ClientSide, *, chunked: bool, read_chunk: int, timeout: float
) -> bool:
    """Stream the request body to the origin; True once it was read and sent whole."""
    stream, reader = upstream.stream, client.reader
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            async with asyncio.timeout(timeout):
                data = await client.stream_reader.read(read_chunk)
            if data:
                reader.receive_data(data)
            else:
                reader.receive_eof()
        elif type(event) is bytes:
            if not event:
                continue
            # One write per piece: tiny writes would become tiny frames on the tunnel.
            stream.write(b"".join(chunk(event)) if chunked else event)
            try:
                await stream.drain()
            except StreamOpenError:
                return False  # the response side sees the same failure and reports it
        elif event is END:
            if chunked:
                stream.write(LAST_CHUNK)  # the client's trailer fields are dropped
            upstream.request_sent = True
            return True
        else:
            raise AbortExchangeError(f"unexpected {event!r} in a request body")


async def _relay_response(
    upstream: Upstream, client: ClientSide, *, upgrade: bool
) -> ExchangeResult:
    reader, writer = upstream.reader, client.writer
    received = head_sent = chunked_out = False
    reusable = client.keep_alive
    # What goes to the client since the last stream read, written with one writelines when the
    # next read would wait (or at the end): a small response whose head and body came in one
    # read costs one send(2), not two. Bounded by what one stream read returns.
    out: list[bytes] = []
    try:
        while True:
            event = reader.next_event()
            if type(event) is bytes:
                if event:
                    if chunked_out:
                        out += chunk(event)
                    else:
                        out.append(event)
            elif event is NEED_DATA:
                if out:
                    writer.writelines(out)
                    out.clear()
                    await writer.drain()
                data = await upstream.stream.read()
                if data:
                    received = True
                    reader.receive_data(data)
                elif not received:
                    text = f"fluidity: {upstream.display} closed the connection, no response\n"
                    raise UpstreamError(502, text, stale=True)
                else:
                    reader.receive_eof()
            elif type(event) is ResponseHead:
                if event.status < 200:
                    if event.status == 101:
                        if upgrade:
                            writer.writelines(out)
                            return ExchangeResult(switch=event)
                        raise ProtocolError("101 without an upgrade request")
                    # 1xx (100 Continue, 103 Early Hints) mean nothing to an HTTP/1.0 client.
                    if client.http_11:
                        out.append(interim_head(event))
                    continue
                head, chunked_out, reusable = client_head(
                    event,
                    http_11=client.http_11,
                    head_request=client.head_request,
                    keep_alive=reusable,
                )
                out.append(head)
                head_sent = True
            elif event is END:
                if chunked_out:
                    out.append(LAST_CHUNK)
                writer.writelines(out)
                await writer.drain()
                return ExchangeResult(client_reusable=reusable)
            elif event is CLOSED:
                text = f"fluidity: {upstream.display} closed the connection, no response\n"
                raise UpstreamError(502, text, stale=False)
            else:
                raise ProtocolError(f"unexpected {event!r}")
    except StreamOpenError as exc:
        writer.writelines(out)  # what was already counted as sent (a head, 1xx answers)
        if head_sent:
            raise AbortExchangeError(str(exc)) from exc
        status = failure_status(exc.failure)
        text = failure_text(upstream.display, exc.failure, exc.message)
        raise UpstreamError(status, text, stale=not received) from exc
    except ProtocolError as exc:
        writer.writelines(out)
        if head_sent:
            raise AbortExchangeError(str(exc)) from exc
        status = 502
        text = f"fluidity: invalid response from {upstream.display}\n"
        if exc.status == 502:  # a limit of ours, e.g. a head too large
            text = f"fluidity: invalid response from {upstream.display}: {exc.reason}\n"
        raise UpstreamError(status, text, stale=False) from exc
