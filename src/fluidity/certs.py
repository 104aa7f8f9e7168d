"""Issue the private CA, server and client certificates that Fluidity's mutual TLS relies on.

One private CA signs everything; the server and every agent trust only that CA. The server
certificate carries a stable DNS name (default ``fluidity-server``) because the server's IP changes
at every start, and the agent checks that name whatever address it dials.

Files are PEM. Private keys are created with mode 0600 from the start (never widened and narrowed
later) and certificates with 0644; the process umask can only remove bits. On Windows file modes
are not enforced by ``os.open``.

Tests build special certificates (expired, from another CA, for another name) with
:func:`create_ca` and :func:`issue_certificate`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fluidity.errors import CertificateError

KeyType = Literal["ecdsa-p256", "rsa4096"]
Role = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
DEFAULT_KEY_TYPE: KeyType = "ecdsa-p256"
DEFAULT_SERVER_NAME = "fluidity-server"
DEFAULT_CLIENT_NAME = "fluidity-client"
DEFAULT_LEAF_DAYS = 730
DEFAULT_CA_DAYS = 3650
MAX_DAYS = 36_500
"""Upper bound on any validity period in days (100 years); beyond it a typo is likelier."""
EXPIRY_WARNING_DAYS = 30
"""Certificates with fewer days left than this are flagged by :func:`describe_certificates`."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before "now" so a peer whose clock lags still accepts them."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$)(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        """The certificate as PEM bytes."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM bytes."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class PkiPaths:
    """The files of a certificate directory: ``ca``, ``server`` and ``client`` ``.crt``/``.key``."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> PkiPaths:
        """The standard file names inside ``directory`` (nothing is read or written)."""
        names = ("ca", "server", "client")
        return cls(directory, *(directory / f"{n}.{ext}" for n in names for ext in ("crt", "key")))

    def files(self) -> list[Path]:
        """The six file paths, CA first."""
        pairs = [(self.ca_cert, self.ca_key), (self.server_cert, self.server_key)]
        pairs.append((self.client_cert, self.client_key))
        return [path for pair in pairs for path in pair]


@dataclass(frozen=True)
class CertificateInfo:
    """What ``fluidity certs show`` and ``fluidity doctor`` report about one certificate file."""

    file: Path
    subject_cn: str
    sans: tuple[str, ...]
    """Subject alternative names as ``DNS:name`` / ``IP:address``."""
    issuer_cn: str
    key_type: str
    """Human-readable key description, e.g. ``ECDSA P-256`` or ``RSA 4096``."""
    is_ca: bool
    not_before: dt.datetime
    not_after: dt.datetime
    """Timezone-aware UTC."""
    days_left: int
    """Whole days until ``not_after`` (rounded down); negative once expired."""

    @property
    def expired(self) -> bool:
        """True once ``not_after`` has passed (as of the time the info was built)."""
        return self.days_left < 0

    @property
    def expiring_soon(self) -> bool:
        """True if still valid but fewer than :data:`EXPIRY_WARNING_DAYS` days remain."""
        return 0 <= self.days_left < EXPIRY_WARNING_DAYS


def generate_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> PrivateKey:
    """Generate a private key: ECDSA on P-256 or 4096-bit RSA (RSA takes about a second)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise CertificateError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def validate_client_name(name: str) -> str:
    """Return ``name`` if it is safe as a file name and CN, else raise :class:`CertificateError`.

    Allowed: 1 to 64 characters from ``A-Z a-z 0-9 . _ -``, not starting with a dot.
    """
    if not _SAFE_NAME.fullmatch(name):
        raise CertificateError(
            f"invalid client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


def parse_san(value: str) -> x509.GeneralName:
    """Turn an IP address or DNS name (optionally prefixed ``IP:`` / ``DNS:``) into a SAN."""
    prefix, colon, rest = value.partition(":")
    kind = prefix.upper() if colon and prefix.upper() in ("IP", "DNS") else ""
    text = rest if kind else value
    if kind != "DNS":
        try:
            return x509.IPAddress(ipaddress.ip_address(text))
        except ValueError:
            if kind == "IP":
                raise CertificateError(f"invalid IP address in SAN {value!r}") from None
    return x509.DNSName(_validate_dns_name(text))


def create_ca(
    common_name: str | None = None,
    *,
    key_type: KeyType = DEFAULT_KEY_TYPE,
    days: int = DEFAULT_CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """Create a self-signed CA that may sign leaf certificates only (path length 0).

    ``common_name`` defaults to ``Fluidity CA <random hex>`` so two CAs are never confused by
    name, neither by a person reading ``certs show`` nor by OpenSSL looking up an issuer.
    Validity is ``days`` (1 to :data:`MAX_DAYS`) from ``not_before`` (default now minus
    :data:`CLOCK_SKEW`), unless ``not_after`` is given explicitly.
    """
    key = generate_key(key_type)
    start, end = _validity(days, not_before, not_after)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(cert_sign=True), True),
    ]
    name = common_name or f"Fluidity CA {secrets.token_hex(4)}"
    return _sign(None, name, key, start=start, end=end, extensions=extensions)


def issue_certificate(
    ca: Issued,
    common_name: str,
    *,
    role: Role,
    sans: Sequence[str] = (),
    key_type: KeyType = DEFAULT_KEY_TYPE,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """Issue a leaf certificate for a server (EKU serverAuth) or a client (EKU clientAuth).

    ``sans`` are IP addresses or DNS names (see :func:`parse_san`); duplicates are dropped. Nothing
    is added implicitly, so a test can make a server certificate for exactly one other name.
    Validity is ``days`` (1 to :data:`MAX_DAYS`) from ``not_before`` (default now minus
    :data:`CLOCK_SKEW`) unless ``not_after`` is explicit (naive datetimes are taken as UTC);
    either may lie in the past, which is how tests make an expired certificate. A ``not_after``
    derived from ``days`` is capped at the CA's own expiry: the chain cannot verify after that.
    """
    key = generate_key(key_type)
    start, end = _validity(days, not_before, not_after)
    if not_after is None:
        end = min(end, ca.certificate.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        # keyEncipherment only matters to RSA key transport (TLS 1.2), kept for old verifiers.
        (_key_usage(key_encipherment=isinstance(key, rsa.RSAPrivateKey)), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    general_names = list(dict.fromkeys(parse_san(san) for san in sans))
    if general_names:
        extensions.append((x509.SubjectAlternativeName(general_names), False))
    return _sign(ca, common_name, key, start=start, end=end, extensions=extensions)


def write_issued(issued: Issued, cert_path: Path, key_path: Path, *, force: bool = False) -> None:
    """Write the certificate (mode 0644) and key (mode 0600) as PEM.

    Without ``force`` an existing file is an error and nothing is written.
    """
    if not force:
        _refuse_existing([cert_path, key_path])
    _write_file(key_path, issued.key_pem(), 0o600, force=force)
    _write_file(cert_path, issued.cert_pem(), 0o644, force=force)


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate; raise :class:`CertificateError` naming the file on failure."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate: {exc}") from exc


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """Read a PEM certificate and its unencrypted PEM key, and check that they belong together."""
    certificate = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CertificateError(f"cannot read {key_path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{key_path}: unsupported key type; use ECDSA or RSA keys")
    if key.public_key() != certificate.public_key():
        raise CertificateError(f"{key_path} does not belong to the certificate {cert_path}")
    return Issued(certificate, key)


def load_ca(directory: Path) -> Issued:
    """Load ``ca.crt`` and ``ca.key`` from ``directory``; explain how to create them if missing."""
    paths = PkiPaths.in_directory(directory)
    for path in (paths.ca_cert, paths.ca_key):
        if not path.exists():
            raise CertificateError(
                f"CA file {path} not found: run `fluidity certs init --dir {directory}` first"
            )
    return load_issued(paths.ca_cert, paths.ca_key)


def init_pki(
    directory: Path,
    *,
    server_name: str = DEFAULT_SERVER_NAME,
    extra_sans: Sequence[str] = (),
    key_type: KeyType = DEFAULT_KEY_TYPE,
    leaf_days: int = DEFAULT_LEAF_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    client_name: str = DEFAULT_CLIENT_NAME,
    force: bool = False,
) -> PkiPaths:
    """Create a CA, a server and a client certificate in ``directory`` (created if missing).

    ``server_name`` is a DNS name of at most 64 characters (the limit of a CN). The server
    certificate has CN ``server_name`` and SANs ``DNS:<server_name>``, ``DNS:localhost``,
    ``IP:127.0.0.1`` and ``extra_sans``. ``leaf_days`` and ``ca_days`` are validity periods in
    days (1 to :data:`MAX_DAYS`). Without ``force``, any existing target file is an error and
    nothing is written; with it all six files are replaced.
    """
    _validate_dns_name(server_name)
    if (
        len(server_name) > 64
        or "*" in server_name
        or isinstance(parse_san(server_name), x509.IPAddress)
    ):
        raise CertificateError(
            f"invalid server name {server_name!r}: use a DNS name of at most 64 characters "
            "(add IP addresses with --san)"
        )
    validate_client_name(client_name)
    sans = [server_name, "localhost", "127.0.0.1", *extra_sans]
    for san in sans:
        parse_san(san)
    _validity(leaf_days, None, None)
    paths = PkiPaths.in_directory(directory)
    if not force:
        _refuse_existing(paths.files())
    ca = create_ca(key_type=key_type, days=ca_days)
    server = issue_certificate(
        ca, server_name, role="server", sans=sans, key_type=key_type, days=leaf_days
    )
    client = issue_certificate(ca, client_name, role="client", key_type=key_type, days=leaf_days)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    write_issued(ca, paths.ca_cert, paths.ca_key, force=force)
    write_issued(server, paths.server_cert, paths.server_key, force=force)
    write_issued(client, paths.client_cert, paths.client_key, force=force)
    return paths


def issue_client(
    directory: Path,
    name: str,
    *,
    key_type: KeyType = DEFAULT_KEY_TYPE,
    days: int = DEFAULT_LEAF_DAYS,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue ``NAME.crt`` / ``NAME.key`` (CN ``name``) signed by the CA in ``directory``.

    ``name`` must pass :func:`validate_client_name`; ``days`` is 1 to :data:`MAX_DAYS` (capped at
    the CA's expiry). Returns ``(cert_path, key_path)``.
    """
    validate_client_name(name)
    if name == "ca":
        # Even with --force, a leaf must never replace the CA's own key.
        raise CertificateError("the client name 'ca' is reserved for the CA's own files")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if not force:
        _refuse_existing([cert_path, key_path])
    client = issue_certificate(
        load_ca(directory), name, role="client", key_type=key_type, days=days
    )
    write_issued(client, cert_path, key_path, force=force)
    return cert_path, key_path


def describe_certificate(path: Path, *, now: dt.datetime | None = None) -> CertificateInfo:
    """Summarise one PEM certificate file; ``now`` (default: current UTC time) sets days_left."""
    cert = load_certificate(path)
    sans: tuple[str, ...] = ()
    is_ca = False
    for extension in cert.extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            dns = [f"DNS:{n}" for n in extension.value.get_values_for_type(x509.DNSName)]
            ips = [f"IP:{a}" for a in extension.value.get_values_for_type(x509.IPAddress)]
            sans = (*dns, *ips)
        elif isinstance(extension.value, x509.BasicConstraints):
            is_ca = extension.value.ca
    not_after = cert.not_valid_after_utc
    moment = _utc(now) if now else dt.datetime.now(dt.UTC)
    return CertificateInfo(
        file=path,
        subject_cn=common_name(cert.subject),
        sans=sans,
        issuer_cn=common_name(cert.issuer),
        key_type=describe_public_key(cert.public_key()),
        is_ca=is_ca,
        not_before=cert.not_valid_before_utc,
        not_after=not_after,
        days_left=(not_after - moment) // dt.timedelta(days=1),
    )


def describe_certificates(
    directory: Path, *, now: dt.datetime | None = None
) -> list[CertificateInfo]:
    """Summarise every ``*.crt`` file in ``directory``, sorted by file name.

    Raises :class:`CertificateError` if the directory is missing or a file is not a PEM certificate.
    """
    if not directory.is_dir():
        raise CertificateError(
            f"certificate directory {directory} not found: "
            f"run `fluidity certs init --dir {directory}`"
        )
    return [describe_certificate(path, now=now) for path in sorted(directory.glob("*.crt"))]


def common_name(name: x509.Name) -> str:
    """The first CN of an X.509 name, or ``""`` if it has none."""
    for attribute in name.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def describe_public_key(key: object) -> str:
    """A short description such as ``ECDSA P-256`` or ``RSA 4096``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {curves.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.removeprefix("_").removesuffix("PublicKey")


def _sign(
    issuer: Issued | None,
    common: str,
    key: PrivateKey,
    *,
    start: dt.datetime,
    end: dt.datetime,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> Issued:
    organization = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fluidity")
    subject = x509.Name([organization, x509.NameAttribute(NameOID.COMMON_NAME, common)])
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer:
        extension = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(extension.value)
        builder = builder.add_extension(aki, critical=False)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def _key_usage(*, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if not_after is None and not 1 <= days <= MAX_DAYS:
        raise CertificateError(f"validity of {days} days is out of range: use 1 to {MAX_DAYS}")
    start = _utc(not_before) if not_before else dt.datetime.now(dt.UTC) - CLOCK_SKEW
    end = _utc(not_after) if not_after else start + CLOCK_SKEW + dt.timedelta(days=days)
    if end <= start:
        raise CertificateError(f"certificate would end ({end}) before it starts ({start})")
    return start, end


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _validate_dns_name(name: str) -> str:
    if not _DNS_NAME.fullmatch(name):
        raise CertificateError(
            f"invalid DNS name {name!r}: use letters, digits, '-' and '.' (e.g. fluidity-server)"
        )
    return name


def _refuse_existing(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertificateError(f"{path} already exists: use --force to overwrite it")


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    # A key must never exist with wider permissions, even briefly, so the mode is set at creation.
    # With force, a fresh temporary file is renamed over the old one: O_TRUNC on the existing file
    # would keep that file's (possibly wider) mode.
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if force:
            os.replace(target, path)
    except FileExistsError as exc:
        raise CertificateError(f"{path} already exists: use --force to overwrite it") from exc
    except OSError as exc:
        if force:
            target.unlink(missing_ok=True)
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc
