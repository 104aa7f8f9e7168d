"""`fluidity doctor`: each check in order, with a pass, a failure and its hint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fluidity import cli
from fluidity.certs import PkiPaths, init_pki
from fluidity.commands.doctor import FAIL, PASS, SKIP, WARN, Doctor, render

from ..integration.origins import make_certificates
from ..integration.stack import running_server
from .corporate_proxy import CorporateProxy

pytestmark = pytest.mark.timeout(60)

ORDER = ["config", "certificates", "CA", "server address", "upstream proxy", "TLS", "PING"]


def write_config(tmp_path: Path, pki: PkiPaths, port: int, extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"server_ip: 127.0.0.1\nserver_port: {port}\n"
        f"cert_file: {pki.client_cert}\nkey_file: {pki.client_key}\nca_cert_file: {pki.ca_cert}\n"
        f"upstream: {{use_environment: false}}\n{extra}"
    )
    return path


def statuses(results: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {check.name: check.status for check in results}


async def test_every_check_passes_against_a_healthy_server(pki: PkiPaths, tmp_path: Path) -> None:
    async with running_server(pki) as server:
        results = await Doctor(write_config(tmp_path, pki, server.port), timeout=5).run()
    assert [c.name for c in results] == ORDER
    assert statuses(results) == {
        "config": PASS,
        "certificates": PASS,
        "CA": PASS,
        "server address": PASS,
        "upstream proxy": SKIP,
        "TLS": PASS,
        "PING": PASS,
    }
    text = render(results)
    assert "TLSv1.3" in text and "answered over the link in" in text
    assert text.endswith("all checks passed")


async def test_the_command_exits_0_only_when_all_pass(
    pki: PkiPaths, tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(pki) as server:
        config = write_config(tmp_path, pki, server.port)
        good = await asyncio.to_thread(
            cli.main, ["doctor", "--config", str(config), "--timeout", "5"]
        )
    bad = await asyncio.to_thread(
        cli.main, ["doctor", "--config", str(config), "--server-port", str(free_port)]
    )
    out = capsys.readouterr().out
    assert good == 0 and bad == 1
    assert "all checks passed" in out and "check(s) failed" in out


async def test_a_server_that_does_not_answer_fails_with_a_hint(
    pki: PkiPaths, tmp_path: Path, free_port: int
) -> None:
    results = await Doctor(write_config(tmp_path, pki, free_port), timeout=5).run()
    found = {c.name: c for c in results}
    assert found["server address"].status == FAIL
    assert "does not answer: Connection refused" in found["server address"].detail
    assert "security group" in found["server address"].hint
    assert found["TLS"].status == FAIL and found["PING"].status == SKIP


@asynccontextmanager
async def intercepting_tls_server(tmp_path: Path) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 whose certificate another CA signed, as a middlebox would."""
    (tmp_path / "middlebox").mkdir()
    context = make_certificates(tmp_path / "middlebox").server_context()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_a_certificate_our_ca_did_not_sign_is_reported_as_tls_inspection(
    pki: PkiPaths, tmp_path: Path
) -> None:
    async with intercepting_tls_server(tmp_path) as port:
        results = await Doctor(write_config(tmp_path, pki, port), timeout=5).run()
    tls = {c.name: c for c in results}["TLS"]
    assert tls.status == FAIL
    assert tls.detail.startswith("TLS inspection detected")
    assert "issued by 'fluidity test CA'" in tls.detail
    assert "ask IT to exempt 127.0.0.1" in tls.hint and "SSL bypass" in tls.hint
    assert statuses(results)["PING"] == SKIP


async def test_an_invalid_config_stops_the_checks_that_need_it(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("server_ip: 127.0.0.1\nserver_prot: 8443\n")
    results = await Doctor(path).run()
    assert results[0].status == FAIL and "did you mean 'server_port'" in results[0].detail
    assert [c.status for c in results[1:]] == [SKIP] * 6


async def test_missing_and_mismatched_certificates_fail(pki: PkiPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other")
    config = write_config(tmp_path, pki, 9).read_text()
    mismatched = tmp_path / "mismatch.yaml"
    mismatched.write_text(config.replace(str(pki.client_key), str(other.client_key)))
    foreign_ca = tmp_path / "foreign.yaml"
    foreign_ca.write_text(config.replace(str(pki.ca_cert), str(other.ca_cert)))
    doctor = Doctor(mismatched, timeout=1)
    loaded = doctor.check_config()
    assert loaded is not None and not doctor.check_certificates(loaded)
    assert "does not belong to the certificate" in doctor.results[-1].detail
    doctor = Doctor(foreign_ca, timeout=1)
    loaded = doctor.check_config()
    assert loaded is not None
    doctor.check_ca(loaded)
    assert doctor.results[-1].status == FAIL
    assert f"{other.ca_cert} did not sign {pki.client_cert}" in doctor.results[-1].detail


async def test_unreadable_certificates_skip_tls_and_ping_but_keep_the_report_whole(
    pki: PkiPaths, tmp_path: Path
) -> None:
    config = write_config(tmp_path, pki, 9).read_text()
    path = tmp_path / "nokey.yaml"
    path.write_text(config.replace(str(pki.client_key), str(tmp_path / "missing.key")))
    results = await Doctor(path, timeout=1).run()
    assert [c.name for c in results] == ORDER
    found = {c.name: c for c in results}
    assert found["certificates"].status == FAIL and found["certificates"].hint
    assert found["TLS"].status == SKIP and "certificates" in found["TLS"].detail
    assert found["PING"].status == SKIP
    assert render(results).endswith("check(s) failed")


async def test_a_certificate_close_to_expiry_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    short = init_pki(tmp_path / "short", leaf_days=10)
    async with running_server(short) as server:
        results = await Doctor(write_config(tmp_path, short, server.port), timeout=5).run()
    found = {c.name: c for c in results}
    assert found["certificates"].status == WARN and "days left" in found["certificates"].detail
    assert all(c.status in (PASS, SKIP, WARN) for c in results)


async def test_the_upstream_proxy_is_checked_and_its_scheme_named(
    pki: PkiPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "ntlm_users"
    users.write_text("CORP:alice:s3cret\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    async with running_server(pki) as server, CorporateProxy(["NTLM"]) as proxy:
        upstream = f"upstream_proxy: http://CORP%5Calice:s3cret@127.0.0.1:{proxy.port}\n"
        results = await Doctor(write_config(tmp_path, pki, server.port, upstream), timeout=5).run()
        wrong = upstream.replace("s3cret", "wrong")
        refused = await Doctor(write_config(tmp_path, pki, server.port, wrong), timeout=5).run()
    found = {c.name: c for c in results}
    assert found["server address"].status == SKIP
    assert found["upstream proxy"].status == PASS
    assert "it asks for: NTLM" in found["upstream proxy"].detail
    assert found["TLS"].status == PASS and found["PING"].status == PASS
    upstream_check = {c.name: c for c in refused}["upstream proxy"]
    assert upstream_check.status == FAIL and "refused the NTLM credentials" in upstream_check.detail
