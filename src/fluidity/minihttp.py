"""A tiny HTTP/1.1 server for small JSON and text APIs (admin endpoint, local control API).

One request per connection (``Connection: close``), parsed by h11, with a bounded head
(``MAX_HEAD`` bytes), a bounded body (``max_body``) and a time limit for the whole request
(``read_timeout``). Not a general web server: no keep-alive, no streaming, no TLS; bind it to
loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import h11

logger = logging.getLogger("fluidity.http")

MAX_HEAD = 16 * 1024
"""Largest request head accepted (bytes); larger gets 431."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names; a repeated field keeps its last value
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body: int = 4096,
    read_timeout: float = 10.0,
) -> asyncio.Server:
    """Listen on ``host:port`` (0 = any free port) and answer every request with ``handler``."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(read_timeout):
                    request = await _read_request(reader, max_body)
            except TimeoutError:
                request = HttpResponse(408, b'{"error":"timeout","reason":"request too slow"}')
            if isinstance(request, HttpRequest):
                response = await handler(request)
            else:
                response = request
            await _write_response(writer, response)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    return await asyncio.start_server(on_client, host, port, limit=MAX_HEAD)


def _refusal(status: int, code: str, reason: str) -> HttpResponse:
    body = f'{{"error":"{code}","reason":"{reason}"}}'.encode()
    return HttpResponse(status, body)


async def _read_request(reader: asyncio.StreamReader, max_body: int) -> HttpRequest | HttpResponse:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            return _refusal(status, "bad_request", "malformed HTTP request")
        if event is h11.NEED_DATA:
            data = await reader.read(MAX_HEAD)
            conn.receive_data(data)
            if not data and head is None:
                return _refusal(400, "bad_request", "incomplete request")
            continue
        if isinstance(event, h11.Request):
            head = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > max_body:
                return _refusal(413, "body_too_large", f"the body is over {max_body} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                return _refusal(413, "body_too_large", f"the body is over {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if head is None:
        return _refusal(400, "bad_request", "incomplete request")
    target = urlsplit(head.target.decode("ascii", "replace"))
    headers = {
        name.decode("ascii").lower(): value.decode("latin-1") for name, value in head.headers
    }
    return HttpRequest(
        method=head.method.decode("ascii", "replace"),
        path=target.path,
        query=dict(parse_qsl(target.query, keep_blank_values=True)),
        headers=headers,
        body=bytes(body),
    )


async def _write_response(writer: asyncio.StreamWriter, response: HttpResponse) -> None:
    try:
        reason = http.HTTPStatus(response.status).phrase.encode()
    except ValueError:
        reason = b""
    head = [
        f"HTTP/1.1 {response.status} ".encode() + reason,
        b"Content-Type: " + response.content_type.encode(),
        b"Content-Length: " + str(len(response.body)).encode(),
        b"Cache-Control: no-store",
        b"Connection: close",
    ]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + response.body)
    await writer.drain()
