"""Local servers that play "the internet" in integration tests. All listen on 127.0.0.1:0.

Each is an async context manager (``async with HttpOrigin() as origin: origin.port``) and can also
be driven with ``await start()`` / ``await stop()``:

* :class:`HttpOrigin` -- HTTP/1.1 (h11, keep-alive); TLS: ``HttpOrigin(certs.server_context())``.

  - ``/echo`` (any method, any suffix/query): 200 JSON ``{method, target, http_version, headers:
    [[name, value], ...], body_length, body_sha256}``; the body is read streaming.
  - ``/bytes/N``: N bytes of :func:`pattern_chunks`; ``?framing=length`` (default), ``chunked``
    or ``close`` (no length, read until the origin closes).
  - ``/status/CODE``: that status; no body for 1xx/204/304, a short text otherwise.
  - ``/reject``: 413 at once, without reading the request body or sending 100 Continue.
  - ``/hop``: a response carrying hop-by-hop headers (``Connection: X-Internal``, ``X-Internal``,
    ``Keep-Alive``, ``Proxy-Authenticate``) next to an end-to-end ``X-Kept: yes``.
  - any path with ``drop=1`` in the query: answer, then close the connection without saying so
    (like an origin whose keep-alive timer fired).
  - ``Expect: 100-continue`` is answered with ``100 Continue`` before the body is read.

  HEAD gets the GET headers without a body. Counters: ``connections``, ``continues_sent``;
  ``requests`` lists every request as (method, target, headers).
* :class:`WebSocketEchoOrigin` -- echoes every message; the text message ``"close CODE REASON"``
  makes it close with that code. ``closes`` records (code, reason) of every finished connection.
* :class:`HalfCloseOrigin` -- raw TCP: reads until EOF, then answers ``b"<length> <sha256>\\n"``
  and closes. Proves that a client's half-close reached it and that data still flows back.
* :func:`make_certificates` -- a throwaway CA and a server certificate for localhost/127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import h11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

HOST = "127.0.0.1"
_BLOCK = random.Random(20240501).randbytes(256 * 1024)


def pattern_chunks(size: int, chunk: int = len(_BLOCK)) -> Iterator[bytes]:
    """Yield ``size`` deterministic pseudo-random bytes in pieces of at most ``chunk`` bytes."""
    chunk = min(chunk, len(_BLOCK))
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield _BLOCK[:n]
        remaining -= n


def pattern_sha256(size: int) -> str:
    """SHA-256 hex digest of :func:`pattern_chunks` of ``size`` bytes."""
    digest = hashlib.sha256()
    for piece in pattern_chunks(size):
        digest.update(piece)
    return digest.hexdigest()


def write_pattern_file(path: Path, size: int) -> str:
    """Write ``size`` pattern bytes to ``path``; return their SHA-256 hex digest."""
    with path.open("wb") as out:
        for piece in pattern_chunks(size):
            out.write(piece)
    return pattern_sha256(size)


class _TcpOrigin:
    """Start/stop plumbing shared by the asyncio-stream origins."""

    ssl_context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(
            self._accept, HOST, 0, ssl=self.ssl_context, limit=256 * 1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def authority(self) -> str:
        return f"{HOST}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # stop() cancels handlers; ending normally keeps asyncio 3.11 from logging it
        finally:
            self._tasks.discard(task)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class RecordedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class HttpOrigin(_TcpOrigin):
    """An HTTP/1.1 test origin; see the module docstring for its endpoints."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.ssl_context = ssl_context
        self.continues_sent = 0
        self.requests: list[RecordedRequest] = []

    def url(self, path: str = "/") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.authority}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1024 * 1024)
        while True:
            event = await _next_event(conn, reader)
            if type(event) is not h11.Request:
                return
            keep = await self._respond(conn, reader, writer, event)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
    ) -> bool:
        method = request.method.decode()
        target = request.target.decode()
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        self.requests.append(RecordedRequest(method, target, headers))
        url = urlsplit(target)
        query = parse_qs(url.query)
        drop = query.get("drop") == ["1"]
        parts = url.path.strip("/").split("/")

        def send(event: h11.Event) -> None:
            data = conn.send(event)
            if data:
                writer.write(data)

        if parts[0] == "reject":
            # Answer at once without reading the body (nor sending 100 Continue), then close.
            head = [(b"Content-Length", b"9"), (b"Connection", b"close")]
            send(h11.Response(status_code=413, headers=head))
            send(h11.Data(data=b"too big\r\n"))
            send(h11.EndOfMessage())
            await writer.drain()
            return False
        if conn.client_is_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            self.continues_sent += 1
        length, digest = await _read_body(conn, reader)

        if parts[0] == "bytes" and len(parts) == 2:
            size = int(parts[1])
            framing = query.get("framing", ["length"])[0]
            if framing == "close":
                # h11 would chunk this for an HTTP/1.1 client; write the old-style head by hand.
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n")
                writer.write(b"Connection: close\r\n\r\n")
                if method != "HEAD":
                    for piece in pattern_chunks(size):
                        writer.write(piece)
                        await writer.drain()
                await writer.drain()
                return False
            head = [(b"Content-Type", b"application/octet-stream")]
            if framing == "length":
                head.append((b"Content-Length", str(size).encode()))
            send(h11.Response(status_code=200, headers=head))
            if method != "HEAD":
                for piece in pattern_chunks(size):
                    send(h11.Data(data=piece))
                    await writer.drain()
            send(h11.EndOfMessage())
        elif parts[0] == "status" and len(parts) == 2:
            status = int(parts[1])
            body = b"" if status in (204, 304) else f"status {status}\n".encode()
            head = [] if status in (204, 304) else [(b"Content-Length", str(len(body)).encode())]
            send(h11.Response(status_code=status, headers=head))
            if body and method != "HEAD":
                send(h11.Data(data=body))
            send(h11.EndOfMessage())
        elif parts[0] == "hop":
            hop = [
                (b"Connection", b"X-Internal"),
                (b"X-Internal", b"secret"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Authenticate", b"Basic realm=origin"),
                (b"X-Kept", b"yes"),
                (b"Content-Length", b"3"),
            ]
            send(h11.Response(status_code=200, headers=hop))
            if method != "HEAD":
                send(h11.Data(data=b"hop"))
            send(h11.EndOfMessage())
        else:
            info = {
                "method": method,
                "target": target,
                "http_version": request.http_version.decode(),
                "headers": headers,
                "body_length": length,
                "body_sha256": digest,
            }
            body = json.dumps(info).encode()
            head = [
                (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()),
            ]
            send(h11.Response(status_code=200, headers=head))
            if method != "HEAD":
                send(h11.Data(data=body))
            send(h11.EndOfMessage())
        await writer.drain()
        return not drop


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event (or PAUSED), reading from ``reader`` as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(256 * 1024))


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    while True:
        event = await _next_event(conn, reader)
        if type(event) is h11.Data:
            digest.update(event.data)
            length += len(event.data)
        elif type(event) is h11.EndOfMessage:
            return length, digest.hexdigest()
        else:
            raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")


class HalfCloseOrigin(_TcpOrigin):
    """Reads until the client's EOF, then answers ``b"<length> <sha256>\\n"`` and closes."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        length = 0
        while data := await reader.read(256 * 1024):
            digest.update(data)
            length += len(data)
        writer.write(f"{length} {digest.hexdigest()}\n".encode())
        await writer.drain()


@dataclass
class WebSocketEchoOrigin:
    """A WebSocket echo server (``websockets`` library); see the module docstring."""

    ssl_context: ssl.SSLContext | None = None
    max_size: int = 4 * 1024 * 1024
    port: int = 0
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    _server: Any = None
    _closed: asyncio.Event | None = None

    async def _echo(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    await ws.close(int(code), reason)
                    break
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            self.closes.append((ws.close_code, ws.close_reason))
            assert self._closed is not None
            self._closed.set()

    async def start(self) -> Self:
        self._closed = asyncio.Event()
        self._server = await serve(
            self._echo, HOST, 0, ssl=self.ssl_context, max_size=self.max_size, compression=None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def wait_for_close(self, count: int = 1) -> list[tuple[int | None, str | None]]:
        """Wait until ``count`` connections have finished; return their close records."""
        assert self._closed is not None
        while len(self.closes) < count:
            self._closed.clear()
            await self._closed.wait()
        return self.closes

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def uri(self, path: str = "/") -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{HOST}:{self.port}{path}"


@dataclass(frozen=True)
class OriginCertificates:
    """A throwaway CA (``ca_path`` for curl ``--cacert``) and a server certificate signed by it,
    valid for ``localhost`` and ``127.0.0.1``."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_certificates(directory: Path) -> OriginCertificates:
    """Create a CA and a localhost server certificate (EC P-256) as PEM files in ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fluidity test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = OriginCertificates(
        directory / "test-ca.pem", directory / "origin.pem", directory / "origin-key.pem"
    )
    paths.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths
