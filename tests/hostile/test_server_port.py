"""Hostile input against the server's agent port: each refused with a log line naming the reason
and the peer (and the agent, once its certificate is known), while a legitimate agent's link and
its open stream carry on untouched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluidity import certs
from fluidity.agent.tunnel import Tunnel
from fluidity.crl import revoke
from fluidity.server.listener import Server
from fluidity.server.reload import TlsReloader
from fluidity.tls import ALPN_PROTOCOL, client_context, server_context
from fluidity.wire import frames
from tests.integration.stack import echo_handler, running_tunnel, server_config, tcp_server

HANDSHAKE_TIMEOUT = 1.0


@dataclass
class Bench:
    """A server, a legitimate agent with an open echo stream, and the certificates to abuse."""

    paths: certs.PkiPaths
    server: Server
    tunnel: Tunnel
    echo_port: int
    stream: object
    caplog: pytest.LogCaptureFixture
    expired: tuple[Path, Path]
    foreign: tuple[Path, Path]
    revoked: tuple[Path, Path]

    def context(self, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        cert, key = pair or (self.paths.client_cert, self.paths.client_key)
        return client_context(cert, key, self.paths.ca_cert)

    async def log_line(self, event: str, local_port: int, timeout: float = 10.0) -> str:
        """The server's ``event`` line about the connection from ``local_port``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        peer = f"peer=127.0.0.1:{local_port}"
        while True:
            for record in self.caplog.records:
                message = record.getMessage()
                if message.startswith(event) and peer in message.split():
                    return message
            if loop.time() > deadline:
                raise AssertionError(f"no {event} for {peer}:\n{self.caplog.text[-3000:]}")
            await asyncio.sleep(0.02)

    async def still_fine(self) -> None:
        stream = self.stream
        stream.write(b"ping")  # type: ignore[attr-defined]
        data = b""
        while len(data) < 4:
            data += await asyncio.wait_for(stream.read(), 5)  # type: ignore[attr-defined]
        assert data == b"ping"
        assert len(self.tunnel.links) == 1 and self.tunnel.state == "connected"


@pytest.fixture
async def bench(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Bench]:
    caplog.set_level(logging.INFO, logger="fluidity")
    paths = certs.init_pki(tmp_path / "certs")
    ca = certs.load_ca(paths.directory)
    now = dt.datetime.now(dt.UTC)

    def write(name: str, issued: certs.Issued) -> tuple[Path, Path]:
        pair = (paths.directory / f"{name}.crt", paths.directory / f"{name}.key")
        certs.write_issued(issued, *pair)
        return pair

    expired = write("old-laptop", certs.issue_certificate(
        ca, "old-laptop", role="client",
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1),
    ))  # fmt: skip
    foreign = write(
        "stranger", certs.issue_certificate(certs.create_ca(), "stranger", role="client")
    )
    revoked = write("lost-laptop", certs.issue_certificate(ca, "lost-laptop", role="client"))
    revoke(paths.directory, "lost-laptop")
    config = server_config(
        handshake_timeout=HANDSHAKE_TIMEOUT, crl_file=paths.directory / "crl.pem",
        cert_file=paths.server_cert, key_file=paths.server_key, ca_cert_file=paths.ca_cert,
    )  # fmt: skip
    server = Server(config, server_context(paths.server_cert, paths.server_key, paths.ca_cert))
    TlsReloader(server, config, lambda: server.ssl_context)  # loads the CRL
    await server.start()
    try:
        async with (
            tcp_server(echo_handler) as echo_port,
            running_tunnel(paths, server.port) as tunnel,
        ):
            stream = await tunnel.open("127.0.0.1", echo_port)
            await stream.wait_open()
            yield Bench(paths, server, tunnel, echo_port, stream, caplog, expired, foreign, revoked)
    finally:
        await server.shutdown(0)


async def _raw(bench: Bench, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", bench.server.port)
    port = writer.get_extra_info("sockname")[1]
    writer.write(data)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 5):
            while await reader.read(4096):
                pass
    except ConnectionError:
        pass
    writer.close()
    return int(port)


async def _tls(bench: Bench, context: ssl.SSLContext, send: bytes = b"") -> int:
    """Connect with ``context``, send ``send`` after the handshake, read until closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bench.server.port)
    port = writer.get_extra_info("sockname")[1]
    try:
        await writer.start_tls(context, server_hostname="fluidity-server")
        if send:
            writer.write(send)
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 5):
            while await reader.read(4096):
                pass
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    return int(port)


def _no_certificate_context(bench: Bench) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(bench.paths.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


def _tls12_context(bench: Bench) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(bench.paths.ca_cert)
    context.load_cert_chain(bench.paths.client_cert, bench.paths.client_key)
    return context


def _other_alpn_context(bench: Bench) -> ssl.SSLContext:
    context = bench.context()
    context.set_alpn_protocols(["h2"])
    return context


HELLO = frames.encode(frames.FrameType.HELLO, 0, 0, frames.hello_payload(1, 65536, 65536))

Attack = Callable[[Bench], Awaitable[int]]
ATTACKS: dict[str, tuple[Attack, str, str]] = {
    # name: (attack, server log event, words the reason must contain)
    "plain-http": (lambda b: _raw(b, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                   "link.handshake_failed", "not TLS"),
    "random-bytes": (lambda b: _raw(b, os.urandom(4096)), "link.handshake_failed", "not TLS"),
    "half-client-hello": (lambda b: _raw(b, bytes.fromhex("16030100c8010000c40303")),
                          "link.handshake_failed", "timed out"),
    "silence": (lambda b: _raw(b, b""), "link.handshake_failed", "timed out"),
    "tls12-only": (lambda b: _tls(b, _tls12_context(b)), "link.handshake_failed", "TLS 1.3"),
    "no-client-certificate": (lambda b: _tls(b, _no_certificate_context(b)),
                              "link.handshake_failed", "no client certificate"),
    "certificate-from-another-ca": (lambda b: _tls(b, b.context(b.foreign)),
                                    "link.handshake_failed", "not signed by the Fluidity CA"),
    "expired-certificate": (lambda b: _tls(b, b.context(b.expired)),
                            "link.handshake_failed", "certificate expired"),
    "revoked-certificate": (lambda b: _tls(b, b.context(b.revoked)),
                            "link.refused", "agent=lost-laptop reason=\"certificate revoked"),
    "wrong-alpn": (lambda b: _tls(b, _other_alpn_context(b)), "link.refused", "ALPN"),
    "garbage-frames": (lambda b: _tls(b, b.context(), b"\xff" * 64),
                       "link.protocol_error", "agent=fluidity-client"),
    "oversized-frame": (lambda b: _tls(b, b.context(), frames.header(3, 0, 1, 1 << 30)),
                        "link.protocol_error", "exceeds the limit"),
    "data-before-hello": (lambda b: _tls(b, b.context(), frames.encode(3, 0, 1, b"x")),
                          "link.protocol_error", "before HELLO"),
    "data-on-unopened-stream": (lambda b: _tls(b, b.context(),
                                               HELLO + frames.encode(3, 0, 77, b"x")),
                                "link.protocol_error", "never opened"),
    "server-bound-open-result": (lambda b: _tls(b, b.context(),
                                                HELLO + frames.encode(2, 0, 1, b"\x00")),
                                 "link.protocol_error", "OPEN_RESULT"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_hostile_connection_is_refused_with_reason_and_peer_and_others_carry_on(
    bench: Bench, attack: str
) -> None:
    run, event, reason = ATTACKS[attack]
    port = await run(bench)
    line = await bench.log_line(event, port)
    assert reason.lower() in line.lower(), line
    await bench.still_fine()
    assert len(bench.server.links) == 1  # only the legitimate agent


async def test_tls_client_that_never_sends_hello_is_closed(bench: Bench) -> None:
    """A valid agent certificate, a finished handshake, then silence: it may not sit there."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", bench.server.port, ssl=bench.context(), server_hostname="fluidity-server"
    )
    port = writer.get_extra_info("sockname")[1]
    started = loop.time()
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 10):
            data = await reader.read()  # the server's HELLO, then the close
    except ConnectionError:
        data = b""
    waited = loop.time() - started
    writer.close()
    assert data == b"" or data.startswith(HELLO[:5])
    assert waited < HANDSHAKE_TIMEOUT + 10
    line = await bench.log_line("link.protocol_error", port)
    assert "agent=fluidity-client" in line and "no HELLO within 1s" in line, line
    await bench.still_fine()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_port_probe_that_sends_nothing_is_logged_at_debug_not_as_a_failure(
    bench: Bench, how: str
) -> None:
    """A TCP health check (or `fluidity up` waiting for the port) is not a failed handshake."""
    bench.caplog.set_level(logging.DEBUG, logger="fluidity.server")
    _, writer = await asyncio.open_connection("127.0.0.1", bench.server.port)
    port = writer.get_extra_info("sockname")[1]
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    line = await bench.log_line("link.probe", port)
    record = next(r for r in bench.caplog.records if r.getMessage() == line)
    assert record.levelno == logging.DEBUG
    peer = f"peer=127.0.0.1:{port}"
    assert not [r for r in bench.caplog.records if r.levelno >= logging.WARNING
                and peer in r.getMessage().split()]  # fmt: skip
    await bench.still_fine()
