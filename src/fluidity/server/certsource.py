"""Where the server's certificate, key and CA come from: files, environment variables or AWS.

``cert_source`` in the server configuration picks one:

- ``file`` (default): ``cert_file``, ``key_file`` and ``ca_cert_file``.
- ``env``: the PEM text (or base64 of it) in ``FLUIDITY_SERVER_CERT_PEM``,
  ``FLUIDITY_SERVER_KEY_PEM`` and ``FLUIDITY_CA_CERT_PEM``. ECS can fill these from a Secrets
  Manager secret with the task definition's ``secrets`` (``valueFrom: <secret-arn>:server_cert::``).
- ``secretsmanager``: one AWS Secrets Manager secret (``cert_secret_name``, default
  ``fluidity/certificates``) whose ``SecretString`` is a JSON object with the fields
  :data:`SECRET_FIELDS` (``server_cert``, ``server_key``, ``ca_cert``), each PEM text or base64 of
  PEM. ``fluidity cloud certs push`` writes it from ``./certs``. Region and credentials come from
  the usual AWS environment (the task role on Fargate; ``AWS_ENDPOINT_URL`` is honoured).

Whatever the source, every field is checked before the server listens: it must decode, parse,
the key must belong to the certificate and the certificate must be issued by the CA. A problem is
a :class:`~fluidity.errors.CertificateError` naming the source and the field. Key material is
never logged. For ``env`` and ``secretsmanager`` the PEM is written for the few milliseconds that
:mod:`ssl` needs to read it into a private (0700) temporary directory, in ``/dev/shm`` when there
is one so that it never reaches a disk, and removed at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluidity.config import ServerConfig
from fluidity.errors import CertificateError, ConfigError
from fluidity.logs import log
from fluidity.tls import server_context

if TYPE_CHECKING:
    from cryptography import x509

logger = logging.getLogger("fluidity.server")

SECRET_FIELDS = ("server_cert", "server_key", "ca_cert")
"""JSON fields of the Secrets Manager secret: the server certificate, its private key, the CA."""

ENV_VARS = {
    "server_cert": "FLUIDITY_SERVER_CERT_PEM",
    "server_key": "FLUIDITY_SERVER_KEY_PEM",
    "ca_cert": "FLUIDITY_CA_CERT_PEM",
}
"""Environment variable holding each field when ``cert_source: env``."""

_PUSH_HINT = "write it with `fluidity cloud certs push` (see docs/fargate.md)"
_MAX_FIELD_CHARS = 64 * 1024  # a PEM certificate or key is a few KiB; refuse anything absurd

SecretFetcher = Callable[[str], str]
"""Returns the ``SecretString`` of the named secret (injectable for tests)."""


@dataclass(frozen=True)
class CertMaterial:
    """Validated PEM bytes of the server certificate, its key and the CA certificate."""

    server_cert: bytes
    server_key: bytes
    ca_cert: bytes


def server_ssl_context(
    config: ServerConfig,
    *,
    environ: Mapping[str, str] | None = None,
    fetch_secret: SecretFetcher | None = None,
) -> ssl.SSLContext:
    """The server's mutual-TLS context with certificates from ``config.cert_source``.

    Raises :class:`CertificateError` (bad or missing material, naming the field) or
    :class:`ConfigError` (the source cannot be reached, e.g. no boto3 or no AWS region).
    """
    if config.cert_source == "file":
        return server_context(config.cert_file, config.key_file, config.ca_cert_file)
    material = load_material(config, environ=environ, fetch_secret=fetch_secret)
    context = _context_from_material(material)
    log(
        logger,
        logging.INFO,
        "server.certificates_loaded",
        source=config.cert_source,
        secret=config.cert_secret_name if config.cert_source == "secretsmanager" else "-",
    )
    return context


def load_material(
    config: ServerConfig,
    *,
    environ: Mapping[str, str] | None = None,
    fetch_secret: SecretFetcher | None = None,
) -> CertMaterial:
    """Read and validate the three PEM fields from the ``env`` or ``secretsmanager`` source."""
    if config.cert_source == "env":
        env = os.environ if environ is None else environ
        where = "environment variable"
        fields = {name: env.get(var) for name, var in ENV_VARS.items()}
        labels = {name: f"{where} {ENV_VARS[name]}" for name in SECRET_FIELDS}
    elif config.cert_source == "secretsmanager":
        secret = config.cert_secret_name
        fetch = fetch_secret or fetch_secret_string
        fields = parse_secret(secret, fetch(secret))
        labels = {name: f"secret {secret!r} field {name!r}" for name in SECRET_FIELDS}
    else:
        raise ConfigError(f"cert_source {config.cert_source!r} does not hold PEM material")
    return validate_material(fields, labels)


def parse_secret(secret: str, text: str) -> dict[str, Any]:
    """The JSON object of a secret's ``SecretString``; errors name the secret and what is wrong."""
    try:
        data = json.loads(text)
    except ValueError:
        raise CertificateError(
            f"secret {secret!r} is not JSON: expected an object with the fields "
            f"{', '.join(SECRET_FIELDS)}; {_PUSH_HINT}"
        ) from None
    if not isinstance(data, dict):
        raise CertificateError(
            f"secret {secret!r} must be a JSON object with the fields "
            f"{', '.join(SECRET_FIELDS)}; {_PUSH_HINT}"
        )
    return data


def validate_material(fields: Mapping[str, Any], labels: Mapping[str, str]) -> CertMaterial:
    """Decode each field (PEM or base64 of PEM), parse it and check that the three fit together."""
    # Imported here, not at module level: cryptography costs about 10 MiB of RSS, and a server
    # with ``cert_source: file`` never needs it (ssl loads and checks the files).
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    pem = {name: _decode_field(fields.get(name), labels[name]) for name in SECRET_FIELDS}
    certificate = _load_cert(pem["server_cert"], labels["server_cert"])
    ca = _load_cert(pem["ca_cert"], labels["ca_cert"])
    try:
        key = serialization.load_pem_private_key(pem["server_key"], password=None)
    except (ValueError, TypeError):
        raise CertificateError(
            f"{labels['server_key']}: not an unencrypted PEM private key; {_PUSH_HINT}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{labels['server_key']}: unsupported key type (use ECDSA or RSA)")
    if key.public_key() != certificate.public_key():
        raise CertificateError(
            f"{labels['server_key']}: does not belong to the certificate in "
            f"{labels['server_cert']}; {_PUSH_HINT}"
        )
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"{labels['server_cert']}: not issued by the CA in {labels['ca_cert']}; {_PUSH_HINT}"
        ) from None
    return CertMaterial(pem["server_cert"], pem["server_key"], pem["ca_cert"])


def fetch_secret_string(secret: str) -> str:
    """Fetch a secret's ``SecretString`` with boto3 (region and credentials from the environment).

    Timeouts are short (5 s connect, 10 s read, 3 attempts) so a task that cannot reach Secrets
    Manager fails its start with a reason instead of hanging.
    """
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError(
            "cert_source: secretsmanager needs boto3: install it with `pip install 'fluidity[aws]'`"
        ) from None
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3})
    try:
        region = os.environ.get("AWS_REGION") or None  # boto3 itself reads AWS_DEFAULT_REGION
        client = boto3.client("secretsmanager", config=config, region_name=region)
        response = client.get_secret_value(SecretId=secret)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise CertificateError(f"secret {secret!r} not found; {_PUSH_HINT}") from None
        if code in ("AccessDeniedException", "AccessDenied"):
            raise CertificateError(
                f"not allowed to read secret {secret!r}: the task role needs "
                "secretsmanager:GetSecretValue on it (fargate.yaml grants it for CertSecretName)"
            ) from None
        raise CertificateError(f"cannot read secret {secret!r}: {code or exc}") from None
    except BotoCoreError as exc:
        raise ConfigError(
            f"cannot reach AWS Secrets Manager for secret {secret!r}: {exc} "
            "(set AWS_REGION and credentials, or use cert_source: file)"
        ) from None
    text = response.get("SecretString")
    if not isinstance(text, str):
        raise CertificateError(
            f"secret {secret!r} has no SecretString (binary secrets are not supported); "
            f"{_PUSH_HINT}"
        )
    return text


def _decode_field(value: Any, label: str) -> bytes:
    if value is None or value == "":
        raise CertificateError(f"{label}: missing; {_PUSH_HINT}")
    if not isinstance(value, str):
        raise CertificateError(f"{label}: expected a string of PEM text or base64 of PEM")
    if len(value) > _MAX_FIELD_CHARS:
        raise CertificateError(f"{label}: longer than {_MAX_FIELD_CHARS} characters")
    text = value.strip()
    if text.startswith("-----BEGIN "):
        return text.encode("ascii", errors="replace") + b"\n"
    try:
        decoded = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded.lstrip().startswith(b"-----BEGIN "):
        raise CertificateError(
            f"{label}: neither PEM text ('-----BEGIN ...') nor base64 of PEM; {_PUSH_HINT}"
        )
    return decoded


def _load_cert(pem: bytes, label: str) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError(f"{label}: not a PEM certificate; {_PUSH_HINT}") from None


def _context_from_material(material: CertMaterial) -> ssl.SSLContext:
    # ssl can only load a certificate chain from files; keep them in memory-backed storage
    # where the system has it, readable by this user only, for as long as loading takes.
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="fluidity-certs-", dir=base) as name:
        directory = Path(name)
        directory.chmod(0o700)
        paths = []
        for filename, data in (
            ("server.crt", material.server_cert),
            ("server.key", material.server_key),
            ("ca.crt", material.ca_cert),
        ):
            path = directory / filename
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            paths.append(path)
        return server_context(paths[0], paths[1], paths[2])
