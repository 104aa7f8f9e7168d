"""Revocation and reload: `fluidity certs revoke NAME` (a lost laptop), the CRL on the server,
certificate and CRL reload without a restart (on change and on SIGHUP), and logs naming agents.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from fluidity import certs
from fluidity.crl import load_crl, revoke
from fluidity.errors import CertificateError
from fluidity.server.listener import Server
from fluidity.server.reload import TlsReloader
from fluidity.tls import server_context
from tests.faults.support import FLUIDITY, Proc, free_port, wait_port, write_server_config
from tests.integration.stack import echo_handler, running_tunnel, server_config, tcp_server


@pytest.fixture
def pki_dir(tmp_path: Path) -> certs.PkiPaths:
    """A fresh PKI per test (revocation changes it) with a second agent, ``laptop-2``."""
    paths = certs.init_pki(tmp_path / "certs")
    certs.issue_client(paths.directory, "laptop-2")
    return paths


def laptop(paths: certs.PkiPaths) -> dict[str, Path]:
    return {"cert": paths.directory / "laptop-2.crt", "key": paths.directory / "laptop-2.key"}


@asynccontextmanager
async def reloading_server(paths: certs.PkiPaths, **overrides: Any) -> AsyncIterator[Server]:
    config = server_config(
        cert_file=paths.server_cert, key_file=paths.server_key, ca_cert_file=paths.ca_cert,
        crl_file=paths.directory / "crl.pem", **overrides,
    )  # fmt: skip
    server = Server(config, server_context(paths.server_cert, paths.server_key, paths.ca_cert))
    reloader = TlsReloader(
        server,
        config,
        lambda: server_context(config.cert_file, config.key_file, config.ca_cert_file),
    )
    server.reloader = reloader  # type: ignore[attr-defined]
    await server.start()
    reloader.start()
    try:
        yield server
    finally:
        await reloader.stop()
        await server.shutdown(0)


async def _echo_once(tunnel: Any, port: int, payload: bytes) -> bytes:
    stream = await tunnel.open("127.0.0.1", port)
    await stream.wait_open()
    stream.write(payload)
    stream.write_eof()
    received = b""
    while data := await stream.read():
        received += data
    return received


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


# --- the CRL itself -------------------------------------------------------------------------


def test_revoke_writes_a_crl_signed_by_the_ca_and_keeps_earlier_entries(
    pki_dir: certs.PkiPaths,
) -> None:
    path, serial, added = revoke(pki_dir.directory, "laptop-2")
    assert added and path == pki_dir.directory / "crl.pem"
    assert serial == certs.load_certificate(pki_dir.directory / "laptop-2.crt").serial_number
    ca = certs.load_certificate(pki_dir.ca_cert)
    first = load_crl(path, ca)
    assert first.serials == {serial} and first.number == 1 and not first.stale

    _, client_serial, _ = revoke(pki_dir.directory, "client")
    _, _, again = revoke(pki_dir.directory, "laptop-2")
    assert not again
    latest = load_crl(path, ca)
    assert latest.serials == {serial, client_serial} and latest.number == 3
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    # OpenSSL agrees (the CRL is standard, for operators' own tools).
    context = ssl.create_default_context(cafile=str(pki_dir.ca_cert))
    context.load_verify_locations(cafile=str(path))


def test_revoke_explains_what_is_wrong(pki_dir: certs.PkiPaths, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="issue-client"):
        revoke(pki_dir.directory, "no-such-laptop")
    other = certs.init_pki(tmp_path / "other")
    shutil.copy(other.client_cert, pki_dir.directory / "stranger.crt")
    with pytest.raises(CertificateError, match="not issued by the CA"):
        revoke(pki_dir.directory, "stranger")
    with pytest.raises(CertificateError, match="not found"):
        revoke(tmp_path / "nowhere", "laptop-2")
    # A CRL signed by another CA is refused when loaded.
    revoke(other.directory, "client")
    with pytest.raises(CertificateError, match="not signed by the CA"):
        load_crl(other.directory / "crl.pem", certs.load_certificate(pki_dir.ca_cert))


def test_revoke_by_serial_and_the_cli_command(pki_dir: certs.PkiPaths) -> None:
    _, serial, _ = revoke(pki_dir.directory, serial=0x1234)
    assert serial == 0x1234
    result = subprocess.run(
        [*FLUIDITY, "certs", "revoke", "laptop-2", "--dir", str(pki_dir.directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Revoked laptop-2" in result.stdout
    revoked = load_crl(pki_dir.directory / "crl.pem", certs.load_certificate(pki_dir.ca_cert))
    assert 0x1234 in revoked.serials and len(revoked.serials) == 2
    missing = subprocess.run(
        [*FLUIDITY, "certs", "revoke", "ghost", "--dir", str(pki_dir.directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "ghost.crt not found" in missing.stderr
    assert "Traceback" not in missing.stderr


# --- the server -----------------------------------------------------------------------------


async def test_revoked_agent_is_refused_with_its_name_and_other_agents_carry_on(
    pki_dir: certs.PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    revoke(pki_dir.directory, "laptop-2")
    async with (
        tcp_server(echo_handler) as echo,
        reloading_server(pki_dir) as server,
        running_tunnel(pki_dir, server.port) as good,
        running_tunnel(pki_dir, server.port, wait=False, **laptop(pki_dir)) as lost,
    ):
        assert not await lost.wait_connected(1.5)
        assert "refused this agent's certificate" in lost.last_error
        assert await _echo_once(good, echo, b"still here") == b"still here"
    refusals = [r.getMessage() for r in caplog.records if "link.refused" in r.getMessage()]
    assert refusals and all("agent=laptop-2" in line for line in refusals), refusals
    assert "certificate revoked" in refusals[0]
    assert "link.up" in caplog.text and "agent=fluidity-client" in caplog.text


async def test_crl_change_is_picked_up_closes_the_revoked_link_and_spares_the_others(
    pki_dir: certs.PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        tcp_server(echo_handler) as echo,
        reloading_server(pki_dir, tls_reload_interval=0.1) as server,
        running_tunnel(pki_dir, server.port) as good,
        running_tunnel(pki_dir, server.port, reconnect_initial=0.2, **laptop(pki_dir)) as lost,
    ):
        assert "tls.crl_missing" in caplog.text
        stream = await good.open("127.0.0.1", echo)  # an open stream across the reload
        await stream.wait_open()
        assert await _echo_once(lost, echo, b"before") == b"before"

        revoke(pki_dir.directory, "laptop-2")
        await _wait_for(lambda: "link.revoked" in caplog.text)
        await _wait_for(lambda: lost.state == "reconnecting")
        await _wait_for(lambda: "certificate revoked" in caplog.text)
        assert not await lost.wait_connected(0.5)

        stream.write(b"after the reload")
        stream.write_eof()
        received = b""
        while data := await stream.read():
            received += data
        assert received == b"after the reload"
        assert await _echo_once(good, echo, b"new stream") == b"new stream"
    revoked_lines = [r.getMessage() for r in caplog.records if "link.revoked" in r.getMessage()]
    assert revoked_lines and "agent=laptop-2" in revoked_lines[0]
    assert "tls.reloaded trigger=changed" in caplog.text


async def test_new_server_certificate_is_used_for_new_links_while_open_links_continue(
    pki_dir: certs.PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        tcp_server(echo_handler) as echo,
        reloading_server(pki_dir, tls_reload_interval=0.1) as server,
        running_tunnel(pki_dir, server.port) as first,
    ):
        stream = await first.open("127.0.0.1", echo)
        await stream.wait_open()
        old_serial = _server_serial(first)
        renewed = certs.issue_certificate(
            certs.load_ca(pki_dir.directory), "fluidity-server", role="server",
            sans=["fluidity-server", "localhost", "127.0.0.1"],
        )  # fmt: skip
        certs.write_issued(renewed, pki_dir.server_cert, pki_dir.server_key, force=True)
        await _wait_for(lambda: "tls.reloaded" in caplog.text)

        async with running_tunnel(pki_dir, server.port) as second:
            assert _server_serial(second) == renewed.certificate.serial_number != old_serial
            assert await _echo_once(second, echo, b"new link") == b"new link"
        stream.write(b"old link")
        stream.write_eof()
        assert await stream.read() == b"old link"
        assert _server_serial(first) == old_serial  # the same link, never re-established


async def test_broken_material_is_refused_on_reload_and_the_server_keeps_serving(
    pki_dir: certs.PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        tcp_server(echo_handler) as echo,
        reloading_server(pki_dir, tls_reload_interval=0.1) as server,
    ):
        (pki_dir.directory / "crl.pem").write_text("-----BEGIN X509 CRL-----\ngarbage\n")
        await _wait_for(lambda: "tls.reload_failed" in caplog.text)
        assert "keeps the certificates" in caplog.text
        async with running_tunnel(pki_dir, server.port) as tunnel:
            assert await _echo_once(tunnel, echo, b"fine") == b"fine"


async def test_sighup_reloads_the_crl_of_a_running_server_process(
    pki_dir: certs.PkiPaths, tmp_path: Path
) -> None:
    port = free_port()
    config = write_server_config(
        tmp_path / "server.yaml", pki_dir, port,
        crl_file=f'"{pki_dir.directory / "crl.pem"}"', tls_reload_interval=0,
    )  # fmt: skip
    proc = Proc(tmp_path, "server", [*FLUIDITY, "server", "--config", str(config)]).start()
    try:
        await wait_port(port, proc)
        async with running_tunnel(pki_dir, port, **laptop(pki_dir)) as lost:
            revoke(pki_dir.directory, "laptop-2")
            proc.signal(signal.SIGHUP)
            await proc.wait_log("tls.reloaded trigger=sighup")
            log = await proc.wait_log("link.revoked")
            assert "agent=laptop-2" in log.split("link.revoked", 1)[1].splitlines()[0]
            await _wait_for(lambda: lost.state == "reconnecting")
            await proc.wait_log("certificate revoked")
        async with running_tunnel(pki_dir, port) as good:
            assert good.state == "connected"
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
    finally:
        proc.stop()


def _server_serial(tunnel: Any) -> int:
    transport = tunnel.links[0].transport
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("SIGHUP and file modes are POSIX", allow_module_level=True)
