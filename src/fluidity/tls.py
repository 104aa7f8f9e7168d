"""TLS contexts for the one mutual-TLS 1.3 link, and plain-language reasons for failed handshakes.

Both sides trust only the Fluidity CA (never the system store), require TLS 1.3 and offer the ALPN
protocol :data:`ALPN_PROTOCOL`. The agent checks the server's certificate against a fixed name
(default ``fluidity-server``), not the IP it dials, because the server's IP changes at every start.

A note for listeners: asyncio's SSL transport closes a connection whose handshake failed without
sending the TLS alert (python/cpython#98078, present at least in CPython 3.11), so a refused agent
may only see the connection close. The server's log line, built with
:func:`explain_handshake_error`, is where the reason is visible: start TLS explicitly after the
accept (``loop.start_tls`` / ``writer.start_tls``), since ``start_server(ssl=...)`` drops handshake
errors outside debug mode. With TLS 1.3 the client finishes its handshake before the server has
checked the client certificate, so an agent learns of a refusal on its first read.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

from fluidity.errors import CertificateError

# cryptography (through fluidity.certs) is imported only to explain a file that ssl refused, or to
# name a peer whose certificate ssl did not decode: importing it costs about 10 MiB of RSS in
# every agent and server process, which otherwise never needs it.

ALPN_PROTOCOL = "fluidity/1"
"""The ALPN protocol both sides offer. OpenSSL does not fail a handshake when the client offers no
common protocol, so the server must also check ``selected_alpn_protocol() == ALPN_PROTOCOL``."""

_NOT_OUR_CA = "certificate not signed by the Fluidity CA (is something intercepting TLS?)"
_WRONG_PURPOSE = "certificate not meant for this role (a client certificate used by a server?)"
_OLD_TLS = "unsupported TLS version (Fluidity needs TLS 1.3)"
_NOT_TLS = "not TLS (is something else listening on that port?)"
_CLOSED = "connection closed during the TLS handshake (the peer may have refused us: see its log)"

# OpenSSL X509_V_ERR_* codes, as seen in SSLCertVerificationError.verify_code.
_VERIFY_CODES = {
    2: _NOT_OUR_CA,  # unable to get issuer certificate
    7: _NOT_OUR_CA,  # certificate signature failure (an issuer with the same name)
    9: "certificate not yet valid (is a clock wrong?)",
    10: "certificate expired",
    18: _NOT_OUR_CA,  # self-signed certificate
    19: _NOT_OUR_CA,  # self-signed certificate in chain (we trust another CA)
    20: _NOT_OUR_CA,  # unable to get local issuer certificate
    21: _NOT_OUR_CA,  # unable to verify the first certificate
    24: "issuer is not a valid CA certificate",
    26: _WRONG_PURPOSE,  # unsuitable certificate purpose (extended key usage)
}
_NAME_MISMATCH_CODES = (62, 64)  # hostname mismatch, IP address mismatch

# OpenSSL reason codes (SSLError.reason). Alerts (``*_ALERT_*``) are the peer telling us why it
# refused *our* side; the others are what this side found wrong.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer sent no client certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "server requires a client certificate and we sent none",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer refused our certificate: certificate expired",
    "TLSV1_ALERT_UNKNOWN_CA": "peer refused our certificate: not signed by the CA it trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer refused our certificate (expired, not yet valid or bad)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": f"peer refused our certificate: {_WRONG_PURPOSE}",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "peer refused our certificate: revoked",
    "UNSUPPORTED_PROTOCOL": _OLD_TLS,
    "NO_PROTOCOLS_AVAILABLE": _OLD_TLS,
    "TLSV1_ALERT_PROTOCOL_VERSION": _OLD_TLS,
    "WRONG_SSL_VERSION": _OLD_TLS,
    "UNSUPPORTED_SSL_VERSION": _OLD_TLS,
    "HTTP_REQUEST": "not TLS: the peer sent a plain HTTP request",
    "HTTPS_PROXY_REQUEST": "not TLS: the peer sent an HTTP proxy request",
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "NO_APPLICATION_PROTOCOL": f"no common ALPN protocol (peer does not speak {ALPN_PROTOCOL})",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "no common ALPN protocol",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no common cipher, group or signature algorithm",
    "NO_SHARED_CIPHER": "no common cipher, group or signature algorithm",
    "UNEXPECTED_EOF_WHILE_READING": _CLOSED,
}
_QUOTED = re.compile(r"'([^']*)'")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_MAX_DETAIL = 120  # characters of an unrecognised error kept in the reason, to bound log lines


def server_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """A server context: TLS 1.3 only, client certificate required and checked against ``ca_file``.

    Raises :class:`CertificateError` naming the file if any file is missing, unreadable or not
    PEM, or if the key does not belong to the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: links are long-lived, and a resumed session would skip the client
    # certificate check, so a certificate that expired since would keep working.
    context.num_tickets = 0
    _configure(context, cert_file, key_file, ca_file)
    return context


def client_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """An agent context: TLS 1.3 only, the server checked against ``ca_file`` and its name.

    Connect with ``server_hostname=<server name>`` (default ``fluidity-server``) whatever IP is
    dialled: the name, not the address, is what the certificate proves. Raises
    :class:`CertificateError` as :func:`server_context` does.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _configure(context, cert_file, key_file, ca_file)
    return context


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The peer certificate's common name, for logs; ``"unknown"`` if there is none.

    Characters outside printable ASCII are replaced by ``?`` so a name cannot forge log lines.
    """
    if ssl_object is None:
        return "unknown"
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:  # handshake not done yet
        return "unknown"
    if not der:
        return "unknown"
    # A verified peer certificate (always, on the server) is decoded by ssl itself.
    name = _first_common_name(ssl_object.getpeercert())
    if name is None:
        from cryptography import x509

        from fluidity import certs

        name = certs.common_name(x509.load_der_x509_certificate(der).subject)
    return _UNPRINTABLE.sub("?", name)[:_MAX_DETAIL] or "unknown"


def _first_common_name(decoded: object) -> str | None:
    """The first CN of a certificate subject as ``getpeercert()`` decodes it; ``None`` if unknown.

    Same answer as :func:`fluidity.certs.common_name`: RDNs in encoded order, first CN wins, ``""``
    for a subject without one. ``None`` when ssl did not decode the certificate (not verified).
    """
    if not isinstance(decoded, dict) or "subject" not in decoded:
        return None
    for rdn in decoded["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def explain_handshake_error(exc: BaseException) -> str:
    """A short reason for a failed TLS handshake, suitable for a log field or an error message.

    Understands OpenSSL 3 verification codes and reason codes on both sides of the link, timeouts
    and closed connections, and follows ``__cause__`` / ``__context__`` to a wrapped ``SSLError``.
    Anything unrecognised yields a generic reason with at most 120 characters of detail.
    """
    inner = _find_ssl_error(exc)
    if isinstance(inner, ssl.SSLCertVerificationError):
        code = inner.verify_code
        message = inner.verify_message or ""
        if code in _NAME_MISMATCH_CODES:
            quoted = _QUOTED.search(message)
            name = quoted.group(1) if quoted else "the name we asked for"
            return f"server name mismatch: certificate is not for '{name}'"
        if code in _VERIFY_CODES:
            return _VERIFY_CODES[code]
        return f"certificate verification failed: {message or 'unknown reason'}"[:_MAX_DETAIL]
    if isinstance(inner, ssl.SSLError):
        reason = inner.reason or ""
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(inner, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return _CLOSED
        detail = reason.lower().replace("_", " ") or str(inner)
        return f"TLS error: {detail}"[:_MAX_DETAIL]
    if isinstance(exc, TimeoutError) or (
        # asyncio and uvloop report ssl_handshake_timeout this way, not as TimeoutError.
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return "TLS handshake timed out"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return _CLOSED
    if isinstance(exc, ConnectionError):
        return (
            "connection reset during the TLS handshake (the peer may have refused us: see its log)"
        )
    return f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL]


def _find_ssl_error(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


def _configure(context: ssl.SSLContext, cert_file: Path, key_file: Path, ca_file: Path) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # Our certificates meet RFC 5280; strict checking keeps them that way and matches Python 3.13+
    # defaults, so an upgrade cannot surprise us.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols([ALPN_PROTOCOL])
    hint = "run `fluidity certs init` or fix the path in the configuration"
    for path in (cert_file, key_file, ca_file):
        if not path.is_file():
            raise CertificateError(f"{path} not found: {hint}")
    try:
        context.load_verify_locations(cafile=ca_file)
        # A password callback that refuses, so an encrypted key fails here instead of OpenSSL
        # prompting on the terminal.
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, OSError, _EncryptedKeyError) as exc:
        # ssl's errors are terse; cryptography's checks name the file and the problem precisely.
        # They run only now, on failure, so that a good configuration never imports cryptography.
        from fluidity import certs

        try:
            certs.load_issued(cert_file, key_file)
            certs.load_certificate(ca_file)
        except CertificateError as precise:
            raise CertificateError(f"{precise}; {hint}") from exc
        raise CertificateError(
            f"cannot load {cert_file}, {key_file} or {ca_file}: {exc}; {hint}"
        ) from exc


class _EncryptedKeyError(Exception):
    """The private key file is encrypted; Fluidity uses unencrypted keys (mode 0600)."""


def _no_password() -> str:
    raise _EncryptedKeyError("the private key is encrypted")


def prime_malloc_for_tls_reads() -> None:
    """Let glibc serve the TLS layer's 256 KiB read buffers from the heap, not from mmap.

    uvloop reads TLS with ``SSLObject.read(256 KiB)``, which allocates a 256 KiB bytes object and
    shrinks it to what was read. Above glibc's mmap threshold (128 KiB at start) every such read
    costs an mmap, an mremap and a munmap (about one of each per new tunnel, measured with
    ``strace -c``). Freeing one mmapped block raises glibc's dynamic threshold to its size, which
    is what this does; a process that happened to import a large package (cryptography) used to
    get that for free. Harmless on other allocators. Called once by the agent and the server.
    """
    block = bytearray(1 << 20)  # 1 MiB: mmapped, and its free sets the threshold to 1 MiB
    del block
