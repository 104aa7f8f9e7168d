"""Real mutual-TLS 1.3 handshakes on 127.0.0.1: who gets in, who is refused, and the reason logged.

The asyncio server below does the handshake with ``writer.start_tls`` inside the connection handler,
as a listener should, so the handshake error reaches code that can log it. asyncio does not send
TLS alerts (python/cpython#98078), so the client-side explanations of alerts are exercised against
a blocking ``ssl`` server in a thread, which does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluidity import certs
from fluidity.errors import CertificateError
from fluidity.tls import (
    ALPN_PROTOCOL,
    client_context,
    explain_handshake_error,
    peer_identity,
    server_context,
)

HANDSHAKE_TIMEOUT = 10.0
NOT_OUR_CA = "certificate not signed by the Fluidity CA (is something intercepting TLS?)"
OLD_TLS = "unsupported TLS version (Fluidity needs TLS 1.3)"


@dataclass(frozen=True)
class Pki:
    """The standard files plus the special certificates the refusal tests need."""

    paths: certs.PkiPaths
    expired: tuple[Path, Path]
    foreign: tuple[Path, Path]
    wrong_name_server: tuple[Path, Path]

    def server(self) -> ssl.SSLContext:
        return server_context(self.paths.server_cert, self.paths.server_key, self.paths.ca_cert)

    def client(self, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        cert, key = pair or (self.paths.client_cert, self.paths.client_key)
        return client_context(cert, key, self.paths.ca_cert)

    def client_without_certificate(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(self.paths.ca_cert)
        context.set_alpn_protocols([ALPN_PROTOCOL])
        return context

    def tls12_client(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(self.paths.ca_cert)
        context.load_cert_chain(self.paths.client_cert, self.paths.client_key)
        return context


# asyncio's own loop here: uvloop's server-side ``start_tls`` never completes the handshake
# (the product's listener uses ``connect_accepted_socket`` instead, tested in test_tunnel).
pytestmark = pytest.mark.stdlib_loop


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    paths = certs.init_pki(directory)
    ca = certs.load_ca(directory)
    now = dt.datetime.now(dt.UTC)

    def write(name: str, issued: certs.Issued) -> tuple[Path, Path]:
        pair = (directory / f"{name}.crt", directory / f"{name}.key")
        certs.write_issued(issued, *pair)
        return pair

    expired = certs.issue_certificate(
        ca,
        "old-laptop",
        role="client",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    foreign = certs.issue_certificate(certs.create_ca(), "stranger", role="client")
    other = certs.issue_certificate(ca, "other-server", role="server", sans=["other-server"])
    return Pki(paths, write("expired", expired), write("foreign", foreign), write("other", other))


@dataclass
class Outcome:
    """What the server saw of one connection."""

    alpn: str | None = None
    identity: str | None = None
    error: BaseException | None = None


class TlsServer:
    """An asyncio server on an ephemeral port of 127.0.0.1 that does the TLS handshake itself."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # every failure is an outcome to check
            self.outcomes.put_nowait(Outcome(error=exc))
            writer.close()
            return
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol()
        self.outcomes.put_nowait(Outcome(alpn=alpn, identity=peer_identity(ssl_object)))
        writer.write(b"ok\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
        writer.close()

    async def next_error(self) -> BaseException:
        outcome = await asyncio.wait_for(self.outcomes.get(), HANDSHAKE_TIMEOUT)
        assert outcome.error is not None, f"server accepted the connection: {outcome}"
        return outcome.error


StartServer = Callable[[ssl.SSLContext], Awaitable[TlsServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[asyncio.Server] = []

    async def start(context: ssl.SSLContext) -> TlsServer:
        tls_server = TlsServer(context)
        server = await asyncio.start_server(tls_server.handle, "127.0.0.1", 0)
        servers.append(server)
        tls_server.port = server.sockets[0].getsockname()[1]
        return tls_server

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def connect(
    port: int, context: ssl.SSLContext, server_name: str = certs.DEFAULT_SERVER_NAME
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=context,
        server_hostname=server_name,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )


async def first_read_or_error(port: int, context: ssl.SSLContext) -> bytes | BaseException:
    """Connect and read; with TLS 1.3 a refused client certificate shows only on the first read."""
    try:
        reader, writer = await connect(port, context)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    try:
        return await asyncio.wait_for(reader.read(100), HANDSHAKE_TIMEOUT)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    finally:
        writer.close()


# --- accepted -----------------------------------------------------------------------------


async def test_good_client_is_accepted_with_fluidity_alpn_and_its_name_logged(
    pki: Pki, start_server: StartServer
) -> None:
    server = await start_server(pki.server())
    reader, writer = await connect(server.port, pki.client())
    assert await reader.readline() == b"ok\n"
    client_side = writer.get_extra_info("ssl_object")
    assert client_side.version() == "TLSv1.3"
    assert client_side.selected_alpn_protocol() == ALPN_PROTOCOL
    assert peer_identity(client_side) == "fluidity-server"
    writer.close()
    outcome = await server.outcomes.get()
    assert outcome == Outcome(alpn=ALPN_PROTOCOL, identity="fluidity-client")


async def test_agent_checks_the_name_not_the_ip_it_dials(
    pki: Pki, start_server: StartServer
) -> None:
    server = await start_server(pki.server())
    reader, writer = await connect(server.port, pki.client(), server_name="localhost")
    assert await reader.readline() == b"ok\n"
    writer.close()


# --- refused by the server, reason in the server's log -----------------------------------


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("none", "peer sent no client certificate"),
        ("foreign", NOT_OUR_CA),
        ("expired", "certificate expired"),
        ("server-cert", "certificate not meant for this role"),
    ],
)
async def test_server_refuses_bad_client_certificates_and_says_why(
    pki: Pki, start_server: StartServer, client: str, reason: str
) -> None:
    contexts = {
        "none": pki.client_without_certificate,
        "foreign": lambda: pki.client(pki.foreign),
        "expired": lambda: pki.client(pki.expired),
        "server-cert": lambda: pki.client((pki.paths.server_cert, pki.paths.server_key)),
    }
    server = await start_server(pki.server())
    result = await first_read_or_error(server.port, contexts[client]())
    assert result in (b"",) or isinstance(result, ssl.SSLError | ConnectionError)
    assert explain_handshake_error(await server.next_error()).startswith(reason)


async def test_server_refuses_tls12_only_client(pki: Pki, start_server: StartServer) -> None:
    server = await start_server(pki.server())
    result = await first_read_or_error(server.port, pki.tls12_client())
    assert isinstance(result, ssl.SSLError | ConnectionError)
    assert explain_handshake_error(await server.next_error()) == OLD_TLS


async def test_server_explains_a_plain_http_client(pki: Pki, start_server: StartServer) -> None:
    server = await start_server(pki.server())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    assert explain_handshake_error(await server.next_error()).startswith("not TLS")


# --- refused by the agent ------------------------------------------------------------------


async def test_agent_refuses_a_server_certificate_for_another_name(
    pki: Pki, start_server: StartServer
) -> None:
    cert, key = pki.wrong_name_server
    server = await start_server(server_context(cert, key, pki.paths.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        await connect(server.port, pki.client())
    assert explain_handshake_error(caught.value) == (
        "server name mismatch: certificate is not for 'fluidity-server'"
    )


async def test_agent_refuses_a_server_signed_by_another_ca(
    pki: Pki, start_server: StartServer
) -> None:
    server = await start_server(pki.server())
    context = client_context(pki.paths.client_cert, pki.paths.client_key, pki.foreign[0])
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        await connect(server.port, context)
    assert explain_handshake_error(caught.value) == NOT_OUR_CA


async def test_agent_explains_a_server_that_does_not_speak_tls(pki: Pki) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    async with server:
        with pytest.raises((ssl.SSLError, ConnectionError)) as caught:
            await connect(server.sockets[0].getsockname()[1], pki.client())
    assert explain_handshake_error(caught.value).startswith("not TLS")


# --- the agent's view when the server sends TLS alerts (blocking ssl server) -------------


async def alert_seen_by_client(server: ssl.SSLContext, client: ssl.SSLContext) -> BaseException:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(HANDSHAKE_TIMEOUT)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(HANDSHAKE_TIMEOUT)
        with (
            conn,
            contextlib.suppress(ssl.SSLError, OSError),
            server.wrap_socket(conn, server_side=True) as tls,
        ):
            tls.sendall(b"ok\n")

    with listener:
        serving = asyncio.create_task(asyncio.to_thread(serve))
        result = await first_read_or_error(listener.getsockname()[1], client)
        await serving
    assert isinstance(result, BaseException), f"client was not refused: {result!r}"
    return result


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("none", "server requires a client certificate and we sent none"),
        ("expired", "peer refused our certificate: certificate expired"),
        ("foreign", "peer refused our certificate: not signed by the CA it trusts"),
        ("tls12", OLD_TLS),
    ],
)
async def test_agent_explains_the_servers_alert(pki: Pki, client: str, reason: str) -> None:
    contexts = {
        "none": pki.client_without_certificate,
        "expired": lambda: pki.client(pki.expired),
        "foreign": lambda: pki.client(pki.foreign),
        "tls12": pki.tls12_client,
    }
    error = await alert_seen_by_client(pki.server(), contexts[client]())
    assert explain_handshake_error(error) == reason


# --- contexts and explanations without a network ----------------------------------------


def test_contexts_require_tls13_our_ca_only_and_alpn(pki: Pki) -> None:
    for context in (pki.server(), pki.client()):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert [c["subject"] for c in context.get_ca_certs()] == [
            ((("organizationName", "Fluidity"),), (("commonName", ca_name(pki)),))
        ]
    assert pki.client().check_hostname


def ca_name(pki: Pki) -> str:
    return certs.describe_certificate(pki.paths.ca_cert).subject_cn


@pytest.mark.parametrize("builder", [server_context, client_context])
def test_context_errors_name_the_file_and_what_to_do(
    pki: Pki, tmp_path: Path, builder: Callable[[Path, Path, Path], ssl.SSLContext]
) -> None:
    paths = pki.paths
    missing = tmp_path / "missing.crt"
    with pytest.raises(CertificateError, match=r"missing\.crt not found: run `fluidity certs init"):
        builder(missing, paths.client_key, paths.ca_cert)
    with pytest.raises(CertificateError, match=r"server\.key does not belong .*client\.crt"):
        builder(paths.client_cert, paths.server_key, paths.ca_cert)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(CertificateError, match=r"garbage\.crt is not a PEM certificate"):
        builder(paths.client_cert, paths.client_key, garbage)
    with pytest.raises(CertificateError, match=r"client\.crt is not an unencrypted PEM private"):
        builder(paths.client_cert, paths.client_cert, paths.ca_cert)


@pytest.mark.parametrize("builder", [server_context, client_context])
def test_encrypted_key_is_refused_without_a_prompt(
    pki: Pki, tmp_path: Path, builder: Callable[[Path, Path, Path], ssl.SSLContext]
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.paths.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    # OpenSSL would otherwise ask for the pass phrase on the terminal; the error names the file.
    with pytest.raises(CertificateError, match=r"encrypted\.key is not an unencrypted PEM private"):
        builder(pki.paths.client_cert, encrypted, pki.paths.ca_cert)


def test_peer_identity_without_a_peer_is_unknown() -> None:
    assert peer_identity(None) == "unknown"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeoutError(), "TLS handshake timed out"),
        (ConnectionResetError(), "connection reset during the TLS handshake"),
        (asyncio.IncompleteReadError(b"", 5), "connection closed during the TLS handshake"),
        (ValueError("odd"), "ValueError: odd"),
    ],
)
def test_explanations_of_non_tls_failures(error: BaseException, reason: str) -> None:
    assert explain_handshake_error(error).startswith(reason)


def test_explanation_follows_a_wrapped_ssl_error() -> None:
    inner = ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")
    inner.reason = "HTTP_REQUEST"
    try:
        try:
            raise inner
        except ssl.SSLError as exc:
            raise RuntimeError("link failed") from exc
    except RuntimeError as outer:
        assert explain_handshake_error(outer) == "not TLS: the peer sent a plain HTTP request"
