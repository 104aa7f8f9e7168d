"""The tunnel over real TLS on 127.0.0.1: streams, flow control, limits, identity, reconnects."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl

import pytest

from fluidity.agent.link import LinkStream
from fluidity.agent.streams import OpenFailure, StreamOpenError
from fluidity.certs import PkiPaths, create_ca, issue_certificate, load_ca, write_issued
from fluidity.config import EgressConfig

from .stack import (
    echo_handler,
    expected_source_digest,
    running_server,
    running_tunnel,
    source_handler,
    tcp_server,
)

MiB = 1024 * 1024


async def read_all(stream: LinkStream) -> bytes:
    chunks = []
    while chunk := await stream.read():
        chunks.append(chunk)
    return b"".join(chunks)


async def test_stream_echoes_bytes_both_ways_with_half_close(pki: PkiPaths) -> None:
    payload = hashlib.sha256(b"seed").digest() * (4 * MiB // 32)
    async with (
        running_server(pki) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as port,
    ):
        stream = await tunnel.open("127.0.0.1", port)
        await stream.wait_open()

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                stream.write(payload[i : i + 100_000])
                await stream.drain()
            stream.write_eof()

        sender = asyncio.create_task(send())
        received = await read_all(stream)
        await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_thousand_concurrent_streams_carry_correct_bytes(pki: PkiPaths) -> None:
    size = 256 * 1024
    async with running_server(pki) as server, running_tunnel(pki, server.port) as tunnel:
        async with tcp_server(source_handler(size)) as port:

            async def one() -> str:
                stream = await tunnel.open("127.0.0.1", port)
                await stream.wait_open()
                stream.write_eof()
                return hashlib.sha256(await read_all(stream)).hexdigest()

            digests = await asyncio.gather(*(one() for _ in range(1000)))
        assert server.stats.snapshot().streams_opened == 1000
    assert set(digests) == {expected_source_digest(size)}


async def test_slow_reader_does_not_stall_other_streams_and_memory_stays_bounded(
    pki: PkiPaths,
) -> None:
    window = 128 * 1024
    size = 32 * MiB
    async with (
        running_server(pki, stream_window=window, stream_buffer=window) as server,
        running_tunnel(pki, server.port, stream_window=window, stream_buffer=window) as tunnel,
        tcp_server(source_handler(size)) as port,
    ):
        stalled = await tunnel.open("127.0.0.1", port)
        await stalled.wait_open()
        first = await stalled.read()  # read once, then never again
        assert first

        busy = await tunnel.open("127.0.0.1", port)
        await busy.wait_open()
        data = await read_all(busy)
        assert hashlib.sha256(data).hexdigest() == expected_source_digest(size)

        # The stalled stream holds at most one window at the agent, whatever the source sent.
        link = tunnel.links[0]
        assert stalled.buffered <= window
        assert link.session.buffered_bytes == 0
        server_link = next(iter(server.links))
        # At the server: a stream's queue stops growing once credit is gone and reading pauses.
        assert server_link.session.buffered_bytes <= window + 256 * 1024
        stalled.close()


async def test_open_failures_come_back_as_codes(pki: PkiPaths, free_port: int) -> None:
    async with running_server(pki) as server, running_tunnel(pki, server.port) as tunnel:
        refused = await tunnel.open("127.0.0.1", free_port)
        with pytest.raises(StreamOpenError) as info:
            await refused.wait_open()
        assert info.value.failure is OpenFailure.REFUSED

        unknown = await tunnel.open("nosuch.invalid", 80)
        with pytest.raises(StreamOpenError) as info:
            await unknown.wait_open()
        assert info.value.failure is OpenFailure.DNS


async def test_egress_policy_denies_metadata_and_loopback_by_default(pki: PkiPaths) -> None:
    async with (
        running_server(pki, egress=EgressConfig()) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as port,
    ):
        for host, target_port in (("127.0.0.1", port), ("169.254.169.254", 80)):
            stream = await tunnel.open(host, target_port)
            with pytest.raises(StreamOpenError) as info:
                await stream.wait_open()
            assert info.value.failure is OpenFailure.DENIED
            assert "egress policy" in info.value.message


async def test_server_stream_limit_is_refused_with_limit_code(pki: PkiPaths) -> None:
    async with (
        running_server(pki, max_streams_per_connection=2) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as port,
    ):
        held = [await tunnel.open("127.0.0.1", port) for _ in range(2)]
        for stream in held:
            await stream.wait_open()
        third = await tunnel.open("127.0.0.1", port)
        with pytest.raises(StreamOpenError) as info:
            await third.wait_open()
        assert info.value.failure is OpenFailure.LIMIT
        assert "stream limit of 2" in info.value.message


async def test_max_connections_refuses_extra_agent_with_clear_reason(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluidity")
    async with (
        running_server(pki, max_connections=1) as server,
        running_tunnel(pki, server.port),
        running_tunnel(pki, server.port, wait=False, reconnect_initial=5) as second,
    ):
        assert not await second.wait_connected(1.0)
        assert "max_connections=1" in second.last_error
    assert "link.refused" in caplog.text
    assert "max_connections=1 reached" in caplog.text


@pytest.mark.parametrize("case", ["no_certificate", "other_ca", "expired", "wrong_server_name"])
async def test_mutual_tls_refusals_are_logged_with_the_reason(
    pki: PkiPaths, tmp_path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime as dt

    caplog.set_level(logging.INFO, logger="fluidity")
    ca = load_ca(pki.directory)
    cert, key, server_name = pki.client_cert, pki.client_key, "fluidity-server"
    if case == "other_ca":
        other = create_ca("Other CA")
        cert, key = tmp_path / "x.crt", tmp_path / "x.key"
        write_issued(issue_certificate(other, "intruder", role="client"), cert, key)
    elif case == "expired":
        now = dt.datetime.now(dt.UTC)
        issued = issue_certificate(
            ca, "old", role="client", not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )  # fmt: skip
        cert, key = tmp_path / "old.crt", tmp_path / "old.key"
        write_issued(issued, cert, key)
    elif case == "wrong_server_name":
        server_name = "someone-else"
    async with running_server(pki) as server:
        if case == "no_certificate":
            context = ssl.create_default_context(cafile=str(pki.ca_cert))
            context.check_hostname = False
            context.set_alpn_protocols(["fluidity/1"])
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", server.port, ssl=context, server_hostname="fluidity-server"
                )
                writer.write(b"x")
                await writer.drain()
                await asyncio.wait_for(_.read(), 2)
                raise ConnectionError("closed")
            await asyncio.sleep(0.2)
            reason = "no client certificate"
            side = "server"
        else:
            async with running_tunnel(
                pki, server.port, cert=cert, key=key, server_name=server_name, wait=False
            ) as tunnel:
                assert not await tunnel.wait_connected(1.0)
                agent_reason = tunnel.last_error
            side = "agent" if case == "wrong_server_name" else "server"
            reason = {"other_ca": "CA", "expired": "expired", "wrong_server_name": "name"}[case]
            if side == "agent":
                assert reason in agent_reason, agent_reason
    if side == "server":
        lines = [
            r.getMessage() for r in caplog.records if "link.handshake_failed" in r.getMessage()
        ]
        assert lines, "server logged no handshake failure"
        assert any(reason.lower() in line.lower() for line in lines), lines
