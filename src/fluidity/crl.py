"""Certificate revocation: ``fluidity certs revoke NAME`` writes a CRL; the server refuses it.

The CRL (``certs/crl.pem`` by default) is a standard X.509 v2 certificate revocation list in PEM,
signed by the Fluidity CA, so ``openssl crl -in certs/crl.pem -text`` reads it. Revoking adds an
entry and re-signs the whole list with the next CRL number; entries are never dropped.

The server loads it (``crl_file``), checks its signature against the CA, and refuses an agent
whose certificate serial it lists right after the TLS handshake, before reading a single frame,
with a log line naming the agent (the certificate's common name) and the reason. The check is
done there rather than inside OpenSSL (``VERIFY_CRL_CHECK_LEAF``) because a failed OpenSSL
handshake gives Python no access to the peer certificate, so the log could not say which agent
was refused. :data:`CRL_VALIDITY_DAYS` sets ``nextUpdate``: the server keeps using a CRL past it
(with a warning), since failing every agent closed because nobody re-signed a list would turn a
forgotten chore into an outage.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fluidity.errors import CertificateError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography (and fluidity.certs, which needs it) is imported inside the functions that use it:
# it costs about 10 MiB of RSS, and a server without ``crl_file`` never needs it.

DEFAULT_CRL_NAME = "crl.pem"
CRL_VALIDITY_DAYS = 3650
"""Days from signing to the CRL's ``nextUpdate`` (informational: see the module docstring)."""


@dataclass(frozen=True)
class RevocationList:
    """The serial numbers a verified CRL revokes, with its number and dates (UTC)."""

    path: Path
    serials: frozenset[int]
    number: int
    last_update: dt.datetime
    next_update: dt.datetime | None

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials

    @property
    def stale(self) -> bool:
        """True once ``nextUpdate`` has passed (re-run ``fluidity certs revoke`` to refresh)."""
        return self.next_update is not None and self.next_update < dt.datetime.now(dt.UTC)


def load_crl(path: Path, ca_certificate: x509.Certificate) -> RevocationList:
    """Read a PEM CRL and check that ``ca_certificate`` issued and signed it.

    Raises :class:`CertificateError` naming the file and the problem.
    """
    from cryptography import x509

    from fluidity import certs

    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        raise CertificateError(f"cannot read the CRL {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate revocation list: {exc}") from exc
    if crl.issuer != ca_certificate.subject or not crl.is_signature_valid(
        ca_certificate.public_key()  # type: ignore[arg-type]  # CA keys are EC or RSA
    ):
        ca_name = certs.common_name(ca_certificate.subject)
        raise CertificateError(
            f"the CRL {path} was not signed by the CA {ca_name!r}: re-create it with "
            "`fluidity certs revoke` in the directory of that CA"
        )
    try:
        number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        number = 0
    return RevocationList(
        path=path,
        serials=frozenset(entry.serial_number for entry in crl),
        number=number,
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
    )


def revoke(
    directory: Path, name: str | None = None, *, serial: int | None = None
) -> tuple[Path, int, bool]:
    """Add the certificate ``<directory>/<name>.crt`` (or ``serial``) to ``<directory>/crl.pem``.

    The CA in ``directory`` must have issued the certificate. Returns ``(crl_path, serial,
    added)``; ``added`` is False if the serial was already listed (the CRL is still re-signed, so
    its dates are fresh). Raises :class:`CertificateError` with what to do on any problem.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtensionOID

    from fluidity import certs

    ca = certs.load_ca(directory)
    if serial is None:
        if not name:
            raise CertificateError("name the certificate to revoke (NAME of NAME.crt) or --serial")
        certs.validate_client_name(name)
        cert_path = directory / f"{name}.crt"
        if not cert_path.exists():
            raise CertificateError(
                f"{cert_path} not found: give the name used with `fluidity certs issue-client` "
                "(`client` for client.crt), or the certificate's serial with --serial"
            )
        certificate = certs.load_certificate(cert_path)
        try:
            certificate.verify_directly_issued_by(ca.certificate)
        except (ValueError, TypeError) as exc:
            raise CertificateError(
                f"{cert_path} was not issued by the CA in {directory}: nothing to revoke there"
            ) from exc
        if certificate.serial_number == ca.certificate.serial_number:
            raise CertificateError("that is the CA itself: to retire it, create a new PKI")
        serial = certificate.serial_number
    elif serial <= 0:
        raise CertificateError(f"invalid serial {serial}: serials are positive integers")
    crl_path = directory / DEFAULT_CRL_NAME
    now = dt.datetime.now(dt.UTC)
    previous = load_crl(crl_path, ca.certificate) if crl_path.exists() else None
    revoked: dict[int, dt.datetime] = {}
    if previous is not None:  # keep every entry with its original revocation date
        for entry in x509.load_pem_x509_crl(crl_path.read_bytes()):
            revoked[entry.serial_number] = entry.revocation_date_utc
    added = serial not in revoked
    revoked.setdefault(serial, now)
    ski = ca.certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - certs.CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=CRL_VALIDITY_DAYS))
        .add_extension(x509.CRLNumber((previous.number if previous else 0) + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for number, when in revoked.items():
        item = x509.RevokedCertificateBuilder().serial_number(number).revocation_date(when)
        builder = builder.add_revoked_certificate(item.build())
    crl = builder.sign(ca.key, hashes.SHA256())
    _write_atomically(crl_path, crl.public_bytes(serialization.Encoding.PEM))
    return crl_path, serial, added


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> int | None:
    """The serial number of the peer's certificate, or ``None`` without one."""
    if ssl_object is None:
        return None
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:
        return None
    if not der:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def revoked_reason(revocations: RevocationList | None, ssl_object: ssl.SSLObject | None) -> str:
    """Why the peer of ``ssl_object`` must be refused (its certificate is revoked), or ``""``."""
    if revocations is None:
        return ""  # no CRL configured: nothing to look up (and no certificate parsing)
    serial = peer_serial(ssl_object)
    if serial is None or not revocations.is_revoked(serial):
        return ""
    return f"certificate revoked (serial {serial:#x}, listed in {revocations.path})"


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` in one step, so a server polling it never reads half a CRL."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc
