"""Server certificates from Secrets Manager (moto on loopback), from the environment and from files.

A good secret lets the server start and an agent link up over mutual TLS with it; a malformed one
is refused before listening with a message naming the secret and the field.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from fluidity.certs import PkiPaths, init_pki
from fluidity.cloud.aws import AwsTarget
from fluidity.cloud.secrets import push_certificates
from fluidity.config import ServerConfig
from fluidity.errors import CertificateError
from fluidity.server.certsource import ENV_VARS, server_ssl_context
from fluidity.server.listener import Server
from tests.awsfixtures import aws_client
from tests.integration.stack import LOOPBACK_EGRESS, echo_handler, running_tunnel, tcp_server


async def assert_tunnel_carries_bytes(server: Server, pki: PkiPaths) -> None:
    """An agent links up over mutual TLS and a stream echoes through the server."""
    async with running_tunnel(pki, server.port) as tunnel, tcp_server(echo_handler) as port:
        stream = await tunnel.open("127.0.0.1", port)
        await stream.wait_open()
        stream.write(b"ping through the tunnel")
        stream.write_eof()
        received = b""
        while chunk := await stream.read():
            received += chunk
    assert received == b"ping through the tunnel"


def secret_name() -> str:
    return f"fluidity/test-{uuid.uuid4().hex[:10]}"


def pem_fields(pki: PkiPaths) -> dict[str, str]:
    return {
        "server_cert": pki.server_cert.read_text(),
        "server_key": pki.server_key.read_text(),
        "ca_cert": pki.ca_cert.read_text(),
    }


def create_secret(endpoint: str, value: Any) -> str:
    name = secret_name()
    text = value if isinstance(value, str) else json.dumps(value)
    aws_client("secretsmanager", endpoint).create_secret(Name=name, SecretString=text)
    return name


def secrets_config(name: str, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": 0,
        "egress": LOOPBACK_EGRESS,
        "cert_source": "secretsmanager",
        "cert_secret_name": name,
    }
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A second, unrelated CA and server certificate."""
    return init_pki(tmp_path_factory.mktemp("other") / "certs")


async def test_server_starts_with_certificates_pushed_to_secrets_manager(
    aws_env: str, pki: PkiPaths
) -> None:
    name = secret_name()
    result = push_certificates(AwsTarget(endpoint_url=aws_env), pki.directory, name)
    assert result.created
    config = secrets_config(name)
    server = Server(config, server_ssl_context(config))
    await server.start()
    try:
        await assert_tunnel_carries_bytes(server, pki)
    finally:
        await server.shutdown(0)


async def test_base64_fields_are_accepted(aws_env: str, pki: PkiPaths) -> None:
    fields = {k: base64.b64encode(v.encode()).decode() for k, v in pem_fields(pki).items()}
    config = secrets_config(create_secret(aws_env, fields))
    server = Server(config, server_ssl_context(config))
    await server.start()
    try:
        await assert_tunnel_carries_bytes(server, pki)
    finally:
        await server.shutdown(0)


def _malformed(pki: PkiPaths, other: PkiPaths) -> list[tuple[str, Any, str]]:
    good = pem_fields(pki)
    return [
        ("not-json", "server_cert=abc", "is not JSON"),
        ("not-an-object", ["server_cert"], "must be a JSON object"),
        (
            "missing-key",
            {k: v for k, v in good.items() if k != "server_key"},
            "field 'server_key': missing",
        ),
        (
            "key-not-pem",
            {**good, "server_key": base64.b64encode(b"hello").decode()},
            "field 'server_key': neither PEM text",
        ),
        (
            "key-of-another-cert",
            {**good, "server_key": other.server_key.read_text()},
            "field 'server_key': does not belong to the certificate",
        ),
        (
            "cert-from-another-ca",
            {**good, "ca_cert": other.ca_cert.read_text()},
            "field 'server_cert': not issued by the CA in secret",
        ),
        (
            "ca-garbage",
            {**good, "ca_cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
            "field 'ca_cert': not a PEM certificate",
        ),
        ("cert-not-a-string", {**good, "server_cert": 42}, "field 'server_cert': expected"),
    ]


CASES = [
    "not-json",
    "not-an-object",
    "missing-key",
    "key-not-pem",
    "key-of-another-cert",
    "cert-from-another-ca",
    "ca-garbage",
    "cert-not-a-string",
]


@pytest.mark.parametrize("case", CASES)
def test_malformed_secret_is_refused_with_the_field_named(
    aws_env: str, pki: PkiPaths, other_pki: PkiPaths, case: str
) -> None:
    _, value, expected = next(c for c in _malformed(pki, other_pki) if c[0] == case)
    name = create_secret(aws_env, value)
    with pytest.raises(CertificateError) as caught:
        server_ssl_context(secrets_config(name))
    message = str(caught.value)
    assert expected in message
    assert name in message
    assert "PRIVATE KEY" not in message  # never echo key material


def test_missing_secret_says_how_to_create_it(aws_env: str) -> None:
    name = secret_name()
    with pytest.raises(CertificateError, match=rf"secret '{name}' not found.*certs push"):
        server_ssl_context(secrets_config(name))


def test_server_process_exits_with_a_clear_error_on_a_malformed_secret(
    aws_env: str, pki: PkiPaths, tmp_path: Path
) -> None:
    name = create_secret(aws_env, {**pem_fields(pki), "server_key": "garbage"})
    env = {
        **os.environ,
        "FLUIDITY_CERT_SOURCE": "secretsmanager",
        "FLUIDITY_CERT_SECRET_NAME": name,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluidity",
            "server",
            "--listen-addr",
            "127.0.0.1",
            "--listen-port",
            "0",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"secret '{name}' field 'server_key'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_environment_source_reads_pem_or_base64(pki: PkiPaths) -> None:
    fields = pem_fields(pki)
    environ = {
        ENV_VARS["server_cert"]: fields["server_cert"],
        ENV_VARS["server_key"]: base64.b64encode(fields["server_key"].encode()).decode(),
        ENV_VARS["ca_cert"]: fields["ca_cert"],
    }
    config = ServerConfig(cert_source="env")
    assert server_ssl_context(config, environ=environ).verify_mode.name == "CERT_REQUIRED"
    del environ[ENV_VARS["ca_cert"]]
    with pytest.raises(
        CertificateError, match="environment variable FLUIDITY_CA_CERT_PEM: missing"
    ):
        server_ssl_context(config, environ=environ)


def test_file_source_is_the_default_and_names_a_missing_file(tmp_path: Path) -> None:
    config = ServerConfig(cert_file=tmp_path / "nope.crt")
    assert config.cert_source == "file"
    with pytest.raises(CertificateError, match=r"nope\.crt not found"):
        server_ssl_context(config)


def test_certs_push_updates_the_secret_and_never_prints_the_key(
    aws_env: str, pki: PkiPaths
) -> None:
    name = secret_name()
    command = [
        sys.executable,
        "-m",
        "fluidity",
        "cloud",
        "--endpoint-url",
        aws_env,
        "certs",
        "push",
        "--dir",
        str(pki.directory),
        "--secret-name",
        name,
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert f"Created secret {name}" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    assert f"Updated secret {name}" in second.stdout
    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert "PRIVATE KEY" not in output
    stored = aws_client("secretsmanager", aws_env).get_secret_value(SecretId=name)
    assert json.loads(stored["SecretString"]) == pem_fields(pki)


def test_certs_push_refuses_a_key_that_does_not_match(
    aws_env: str, pki: PkiPaths, other_pki: PkiPaths, tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "server.crt").write_text(pki.server_cert.read_text())
    (mixed / "server.key").write_text(other_pki.server_key.read_text())
    (mixed / "ca.crt").write_text(pki.ca_cert.read_text())
    name = secret_name()
    with pytest.raises(CertificateError, match=r"server\.key: does not belong"):
        push_certificates(AwsTarget(endpoint_url=aws_env), mixed, name)
    names = aws_client("secretsmanager", aws_env).list_secrets()["SecretList"]
    assert name not in {s["Name"] for s in names}
