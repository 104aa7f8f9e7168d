"""Certificate issuing: files, modes, names, extensions, refusals, `certs show` and the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

import fluidity.cli
from fluidity import certs
from fluidity.errors import CertificateError

SIX_FILES = ["ca.crt", "ca.key", "client.crt", "client.key", "server.crt", "server.key"]


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """A known umask, so file modes are exactly what the code asks for."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def pki(tmp_path: Path) -> certs.PkiPaths:
    return certs.init_pki(tmp_path / "certs")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this module's command: the other command modules do not exist yet."""
    monkeypatch.setattr(fluidity.cli, "COMMAND_MODULES", ("certs",))
    monkeypatch.setenv("COLUMNS", "250")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- certs init -----------------------------------------------------------------------------


def test_init_creates_exactly_six_files_with_private_keys_0600_and_certs_0644(
    pki: certs.PkiPaths,
) -> None:
    assert sorted(p.name for p in pki.directory.iterdir()) == SIX_FILES
    for path in pki.files():
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644), path
        assert path.read_bytes().startswith(b"-----BEGIN ")


def test_server_certificate_is_for_server_name_localhost_loopback_and_extra_sans(
    tmp_path: Path,
) -> None:
    paths = certs.init_pki(
        tmp_path, server_name="tunnel.example.org", extra_sans=["10.1.2.3", "alt.example.org"]
    )
    server = load(paths.server_cert)
    san = ext(server, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == [
        "tunnel.example.org",
        "localhost",
        "alt.example.org",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    assert certs.common_name(server.subject) == "tunnel.example.org"


def test_default_server_name_is_fluidity_server(pki: certs.PkiPaths) -> None:
    info = certs.describe_certificate(pki.server_cert)
    assert info.subject_cn == "fluidity-server"
    assert info.sans == ("DNS:fluidity-server", "DNS:localhost", "IP:127.0.0.1")


def test_ca_may_sign_leaf_certificates_only(pki: certs.PkiPaths) -> None:
    ca = load(pki.ca_cert)
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = ext(ca, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.issuer == ca.subject
    ext(ca, x509.SubjectKeyIdentifier)


@pytest.mark.parametrize(
    ("role", "eku"),
    [("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)],
)
def test_leaf_certificates_have_one_purpose_and_chain_to_the_ca(
    pki: certs.PkiPaths, role: str, eku: x509.ObjectIdentifier
) -> None:
    ca = load(pki.ca_cert)
    leaf = load(pki.server_cert if role == "server" else pki.client_cert)
    leaf.verify_directly_issued_by(ca)
    assert ext(leaf, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    usage = ext(leaf, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [eku]  # type: ignore[call-overload]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    ca_ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    ext(leaf, x509.SubjectKeyIdentifier)


def test_keys_are_ecdsa_p256_by_default(pki: certs.PkiPaths) -> None:
    for name in ("ca", "server", "client"):
        key = load(pki.directory / f"{name}.crt").public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == "secp256r1"


def test_rsa4096_keys_on_request_with_key_encipherment(tmp_path: Path) -> None:
    paths = certs.init_pki(tmp_path, key_type="rsa4096")
    for path in (paths.ca_cert, paths.server_cert, paths.client_cert):
        key = load(path).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.key_size == 4096
    usage = ext(load(paths.server_cert), x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature and usage.key_encipherment
    assert certs.describe_certificate(paths.client_cert).key_type == "RSA 4096"
    certs.load_issued(paths.server_cert, paths.server_key)


def test_validity_starts_five_minutes_ago_and_lasts_the_requested_days(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.UTC)
    paths = certs.init_pki(tmp_path, leaf_days=10, ca_days=20)
    after = dt.datetime.now(dt.UTC)
    for path, days in ((paths.ca_cert, 20), (paths.server_cert, 10), (paths.client_cert, 10)):
        cert = load(path)
        start = cert.not_valid_before_utc
        assert (
            before - dt.timedelta(minutes=5, seconds=1) <= start <= after - dt.timedelta(minutes=5)
        )
        lifetime = cert.not_valid_after_utc - before
        assert dt.timedelta(days=days) - dt.timedelta(seconds=1) <= lifetime
        assert lifetime <= dt.timedelta(days=days, seconds=5)


def test_serial_numbers_are_random_and_distinct(tmp_path: Path) -> None:
    serials = set()
    for run in range(2):
        paths = certs.init_pki(tmp_path / str(run))
        serials |= {load(p).serial_number for p in (paths.ca_cert, paths.server_cert)}
    assert len(serials) == 4
    assert all(s.bit_length() > 64 for s in serials)


def test_init_refuses_to_overwrite_and_names_the_file(pki: certs.PkiPaths) -> None:
    before = {p: p.read_bytes() for p in pki.files()}
    with pytest.raises(CertificateError, match=r"ca\.crt already exists: use --force"):
        certs.init_pki(pki.directory)
    assert {p: p.read_bytes() for p in pki.files()} == before


def test_init_refusal_writes_nothing_when_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("mine")
    with pytest.raises(CertificateError, match=r"client\.key already exists"):
        certs.init_pki(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["client.key"]


def test_init_with_force_replaces_everything_and_restores_key_modes(
    pki: certs.PkiPaths,
) -> None:
    old_ca = pki.ca_cert.read_bytes()
    pki.server_key.chmod(0o644)
    certs.init_pki(pki.directory, force=True)
    assert pki.ca_cert.read_bytes() != old_ca
    assert mode(pki.server_key) == 0o600
    assert sorted(p.name for p in pki.directory.iterdir()) == SIX_FILES
    load(pki.server_cert).verify_directly_issued_by(load(pki.ca_cert))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"server_name": "bad name"}, "invalid DNS name"),
        ({"server_name": "10.0.0.1"}, "invalid server name"),
        ({"server_name": "a" * 40 + "." + "b" * 30}, "invalid server name"),
        ({"extra_sans": ["not a name"]}, "invalid DNS name"),
        ({"extra_sans": ["IP:999.1.1.1"]}, "invalid IP address"),
        ({"leaf_days": 0}, "out of range"),
        ({"ca_days": certs.MAX_DAYS + 1}, "out of range"),
        ({"client_name": ".hidden"}, "invalid client name"),
    ],
)
def test_init_rejects_bad_input_before_writing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        certs.init_pki(tmp_path / "certs", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "certs").exists()


# --- issue-client and the low-level API ---------------------------------------------------


def test_issue_client_is_signed_by_the_existing_ca(pki: certs.PkiPaths) -> None:
    cert_path, key_path = certs.issue_client(pki.directory, "laptop-2.home_1")
    assert (cert_path.name, key_path.name) == ("laptop-2.home_1.crt", "laptop-2.home_1.key")
    assert (mode(cert_path), mode(key_path)) == (0o644, 0o600)
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(pki.ca_cert))
    assert certs.common_name(cert.subject) == "laptop-2.home_1"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [  # type: ignore[call-overload]
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    certs.load_issued(cert_path, key_path)


def test_issue_client_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca\.crt not found: run `fluidity certs init"):
        certs.issue_client(tmp_path, "laptop")
    assert list(tmp_path.iterdir()) == []


def test_issue_client_refuses_to_overwrite_without_force(pki: certs.PkiPaths) -> None:
    certs.issue_client(pki.directory, "laptop")
    with pytest.raises(CertificateError, match=r"laptop\.crt already exists: use --force"):
        certs.issue_client(pki.directory, "laptop")
    certs.issue_client(pki.directory, "laptop", force=True)


@pytest.mark.parametrize(
    "name", ["", ".hidden", "../escape", "a/b", "a b", "naïve", "x" * 65, "ca", "a\nb"]
)
def test_issue_client_rejects_unsafe_names(pki: certs.PkiPaths, name: str) -> None:
    with pytest.raises(CertificateError, match="client name"):
        certs.issue_client(pki.directory, name)
    assert sorted(p.name for p in pki.directory.iterdir()) == SIX_FILES


def test_issue_certificate_makes_expired_and_foreign_certificates() -> None:
    ca, other_ca = certs.create_ca(), certs.create_ca()
    assert certs.common_name(ca.certificate.subject) != certs.common_name(
        other_ca.certificate.subject
    )
    now = dt.datetime.now(dt.UTC)
    expired = certs.issue_certificate(
        ca,
        "old",
        role="client",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    assert expired.certificate.not_valid_after_utc < now
    foreign = certs.issue_certificate(other_ca, "stranger", role="client")
    with pytest.raises(ValueError, match=r"signature|Issuer"):
        foreign.certificate.verify_directly_issued_by(ca.certificate)
    other_name = certs.issue_certificate(ca, "elsewhere", role="server", sans=["elsewhere"])
    assert certs.describe_public_key(other_name.certificate.public_key()) == "ECDSA P-256"


def test_leaf_validity_is_capped_at_the_ca_expiry() -> None:
    ca = certs.create_ca(days=5)
    leaf = certs.issue_certificate(ca, "c", role="client", days=100)
    assert leaf.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_load_issued_detects_a_key_from_another_certificate(pki: certs.PkiPaths) -> None:
    with pytest.raises(CertificateError, match=r"server\.key does not belong"):
        certs.load_issued(pki.client_cert, pki.server_key)


# --- show -----------------------------------------------------------------------------------


def test_describe_certificates_lists_every_crt_with_expiry(pki: certs.PkiPaths) -> None:
    infos = certs.describe_certificates(pki.directory)
    assert [i.file.name for i in infos] == ["ca.crt", "client.crt", "server.crt"]
    ca_info, client, server = infos
    assert ca_info.is_ca and not client.is_ca
    assert client.issuer_cn == server.issuer_cn == ca_info.subject_cn
    assert ca_info.subject_cn.startswith("Fluidity CA ")
    assert client.subject_cn == "fluidity-client"
    assert client.key_type == "ECDSA P-256"
    assert client.days_left == 729  # 730 days minus a few seconds, rounded down
    assert ca_info.days_left == 3649
    assert not client.expired and not client.expiring_soon


def test_days_to_expiry_flags_expired_and_soon_expiring_certificates(tmp_path: Path) -> None:
    ca = certs.create_ca()
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    cases = {"past": dt.timedelta(hours=-1), "soon": dt.timedelta(days=29, hours=1)}
    cases["later"] = dt.timedelta(days=30, hours=1)
    for name, delta in cases.items():
        leaf = certs.issue_certificate(
            ca, name, role="client", not_before=now - dt.timedelta(days=1), not_after=now + delta
        )
        certs.write_issued(leaf, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    infos = {i.subject_cn: i for i in certs.describe_certificates(tmp_path, now=now)}
    assert (infos["past"].days_left, infos["past"].expired) == (-1, True)
    assert (infos["soon"].days_left, infos["soon"].expiring_soon) == (29, True)
    assert (infos["later"].days_left, infos["later"].expiring_soon) == (30, False)


def test_describe_certificates_of_a_missing_directory_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not found: run `fluidity certs init"):
        certs.describe_certificates(tmp_path / "nope")


# --- CLI --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cli")
def test_cli_init_issue_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "c")
    init = ["certs", "init", "--dir", directory, "--server-name", "tun.example", "--san", "::1"]
    assert fluidity.cli.main([*init, "--days", "20", "--client-name", "me"]) == 0
    assert fluidity.cli.main(["certs", "issue-client", "phone", "--dir", directory]) == 0
    now = dt.datetime.now(dt.UTC)
    ca = certs.load_ca(Path(directory))
    start, end = now - dt.timedelta(days=9), now - dt.timedelta(days=2)
    old = certs.issue_certificate(ca, "old", role="client", not_before=start, not_after=end)
    certs.write_issued(old, tmp_path / "c" / "old.crt", tmp_path / "c" / "old.key")
    capsys.readouterr()
    assert fluidity.cli.main(["certs", "show", "--dir", directory]) == 0
    out = capsys.readouterr().out
    for text in ("server.crt", "tun.example", "IP:::1", "phone.crt", "ECDSA P-256", "(CA)"):
        assert text in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if ".crt" in line}
    assert "EXPIRED" in rows["old.crt"]
    assert "19 (< 30)" in rows["client.crt"] and " me " in rows["client.crt"]
    assert "EXPIRED" not in rows["ca.crt"]


@pytest.mark.usefixtures("cli")
def test_cli_refuses_overwrite_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fluidity.cli.main(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert fluidity.cli.main(["certs", "init", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fluidity: error:" in err and "ca.crt already exists: use --force" in err
    assert fluidity.cli.main(["certs", "init", "--dir", str(tmp_path), "--force"]) == 0


@pytest.mark.usefixtures("cli")
def test_cli_rejects_bad_client_name_and_missing_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fluidity.cli.main(["certs", "issue-client", "x", "--dir", str(tmp_path)]) == 2
    assert "run `fluidity certs init" in capsys.readouterr().err
    assert fluidity.cli.main(["certs", "issue-client", ".x", "--dir", str(tmp_path)]) == 2
    assert "invalid client name" in capsys.readouterr().err


@pytest.mark.usefixtures("cli")
def test_cli_rsa_key_type_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        fluidity.cli.main(["certs", "init", "--dir", str(tmp_path), "--key-type", "dsa"])
    assert list(tmp_path.iterdir()) == []
