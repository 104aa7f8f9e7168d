"""One request/response exchange between a client connection and an upstream stream.

The request head is already on its way; this streams the request body to the origin while the
response comes back (so ``100 Continue`` and early answers work), relaying every response event
through the client's h11 connection. Memory: one ``read_chunk`` from the client and one stream
read in flight, each followed by a drain before the next.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11

from fluidity.agent.http_messages import (
    downstream_response_headers,
    failure_status,
    failure_text,
)
from fluidity.agent.streams import StreamOpenError, TunnelStream


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
    """A stream to an origin and the h11 client connection that frames HTTP on it."""

    key: tuple[str, int]
    display: str  # host:port, for messages
    stream: TunnelStream
    conn: h11.Connection

    def send(self, event: h11.Event) -> None:
        """Serialise ``event`` with h11 and write it to the stream (no drain)."""
        pieces = self.conn.send_with_data_passthrough(event)
        if pieces:
            # One write per event: chunked framing gives [size line, data, CRLF], and tiny writes
            # would become tiny frames on the tunnel.
            self.stream.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def reusable_for(self, key: tuple[str, int]) -> bool:
        """True if the next request to ``key`` can go over this connection."""
        return (
            self.key == key
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
        )

    def finish(self) -> bool:
        """After an exchange: prepare for the next request; False if the origin cannot reuse it."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


async def exchange(
    upstream: Upstream,
    client: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    has_body: bool,
    upgrade: bool,
    read_chunk: int,
    body_timeout: float,
) -> h11.InformationalResponse | None:
    """Relay the origin's response to the client, uploading the request body concurrently.

    Returns the origin's ``101`` when ``upgrade`` was requested and granted (nothing has been sent
    to the client for it yet), else ``None`` once the response is complete; the request body may
    still be unread if the origin answered early. ``body_timeout`` (seconds) bounds each wait for
    request-body bytes. Raises :class:`UpstreamError`, :class:`AbortExchangeError`, or the client
    side's ``OSError`` / ``TimeoutError`` / ``h11.RemoteProtocolError``.
    """
    relay = _relay_response(upstream, client, writer, upgrade=upgrade)
    if not has_body:
        return await relay
    upload = asyncio.ensure_future(
        _upload(upstream, client, reader, read_chunk=read_chunk, timeout=body_timeout)
    )
    response = asyncio.ensure_future(relay)
    try:
        pending: set[asyncio.Future[Any]] = {upload, response}
        while not response.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if upload in done and upload.exception() is not None:
                upload.result()  # the client side failed: raise its error
        return response.result()
    finally:
        upload.cancel()
        response.cancel()
        await asyncio.gather(upload, response, return_exceptions=True)


async def _upload(
    upstream: Upstream,
    client: h11.Connection,
    reader: asyncio.StreamReader,
    *,
    read_chunk: int,
    timeout: float,
) -> None:
    """Stream the request body to the origin, chunk by chunk (trailers are dropped)."""
    stream = upstream.stream
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout(timeout):
                client.receive_data(await reader.read(read_chunk))
        elif type(event) is h11.Data:
            upstream.send(event)
            try:
                await stream.drain()
            except StreamOpenError:
                return  # the response side sees the same failure and reports it
        elif type(event) is h11.EndOfMessage:
            upstream.send(h11.EndOfMessage())
            return
        else:
            raise AbortExchangeError(f"unexpected {type(event).__name__} in a request body")


async def _relay_response(
    upstream: Upstream,
    client: h11.Connection,
    writer: asyncio.StreamWriter,
    *,
    upgrade: bool,
) -> h11.InformationalResponse | None:
    origin = upstream.conn
    received = head_sent = False
    # What h11 produced for the client since the last stream read, written with one writelines
    # when the next read would wait (or at the end): a small response whose head and body came in
    # one read costs one send(2), not two. Bounded by what one stream read returns.
    out: list[bytes] = []
    try:
        while True:
            event = origin.next_event()
            if event is h11.NEED_DATA:
                if out:
                    writer.writelines(out)
                    out.clear()
                    await writer.drain()
                data = await upstream.stream.read()
                if not data and not received:
                    text = f"fluidity: {upstream.display} closed the connection, no response\n"
                    raise UpstreamError(502, text, stale=True)
                received = True
                origin.receive_data(data)
            elif type(event) is h11.Data:
                # The origin's Data event goes to the client as is: no copy, h11 re-frames it.
                out.extend(client.send_with_data_passthrough(event) or ())
            elif type(event) is h11.Response:
                headers = downstream_response_headers(event.headers.raw_items(), upgrade=False)
                head = h11.Response(
                    status_code=event.status_code, reason=event.reason, headers=headers
                )
                out.append(client.send(head))
                head_sent = True
            elif type(event) is h11.EndOfMessage:
                out.append(client.send(h11.EndOfMessage()))
                writer.writelines(out)
                await writer.drain()
                return None
            elif type(event) is h11.InformationalResponse:
                if event.status_code == 101:
                    if upgrade:
                        writer.writelines(out)
                        return event
                    raise h11.RemoteProtocolError("101 without an upgrade request")
                # 1xx (100 Continue, 103 Early Hints) mean nothing to an HTTP/1.0 client.
                if client.their_http_version == b"1.1":
                    headers = downstream_response_headers(event.headers.raw_items(), upgrade=False)
                    info = h11.InformationalResponse(
                        status_code=event.status_code, reason=event.reason, headers=headers
                    )
                    out.append(client.send(info))
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
    except StreamOpenError as exc:
        writer.writelines(out)  # what h11 already counts as sent (a head, 1xx answers)
        if head_sent:
            raise AbortExchangeError(str(exc)) from exc
        status = failure_status(exc.failure)
        text = failure_text(upstream.display, exc.failure, exc.message)
        raise UpstreamError(status, text, stale=not received) from exc
    except h11.ProtocolError as exc:
        writer.writelines(out)
        if head_sent:
            raise AbortExchangeError(str(exc)) from exc
        text = f"fluidity: invalid response from {upstream.display}\n"
        raise UpstreamError(502, text, stale=False) from exc
