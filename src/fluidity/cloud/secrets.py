"""``fluidity cloud certs push``: the server's certificate, key and CA into Secrets Manager.

Writes the JSON secret that ``cert_source: secretsmanager`` reads (fields ``server_cert``,
``server_key``, ``ca_cert``, PEM text), after checking the files exactly as the server will. The
key goes to Secrets Manager only (encrypted with the account's ``aws/secretsmanager`` key): never
to a CloudFormation parameter, a stack output or a log line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fluidity.cloud.aws import AwsTarget, aws_errors
from fluidity.errors import CertificateError
from fluidity.server.certsource import SECRET_FIELDS, validate_material

FILES = {"server_cert": "server.crt", "server_key": "server.key", "ca_cert": "ca.crt"}
"""Secret field -> file name in the certificate directory (``fluidity certs init`` names)."""


@dataclass(frozen=True)
class PushResult:
    secret: str
    arn: str
    version: str
    created: bool


def read_certificates(directory: Path) -> dict[str, str]:
    """The three PEM files of ``directory``, validated (key matches, issued by the CA)."""
    fields: dict[str, str] = {}
    for field, name in FILES.items():
        path = directory / name
        try:
            fields[field] = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not PEM text"
            raise CertificateError(
                f"cannot read {path}: {reason} (run `fluidity certs init` or pass --dir)"
            ) from None
    labels = {field: str(directory / FILES[field]) for field in SECRET_FIELDS}
    validate_material(fields, labels)
    return fields


def push_certificates(target: AwsTarget, directory: Path, secret: str) -> PushResult:
    """Create the secret, or store a new version of it."""
    from botocore.exceptions import ClientError

    body = json.dumps(read_certificates(directory))
    client = target.client("secretsmanager")
    with aws_errors(f"writing secret {secret}"):
        try:
            response = client.put_secret_value(SecretId=secret, SecretString=body)
            created = False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            response = client.create_secret(
                Name=secret,
                Description="Fluidity server certificate, key and CA (fluidity cloud certs push)",
                SecretString=body,
            )
            created = True
    return PushResult(secret, str(response["ARN"]), str(response.get("VersionId", "")), created)
