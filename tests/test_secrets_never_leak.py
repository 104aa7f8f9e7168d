"""Secrets never reach a log line, at any level up to info, in text or JSON.

Real ``fluidity server`` and ``fluidity agent`` processes carry traffic whose every sensitive part
is a recognisable marker: a query string, header values (Authorization, Cookie), a request body,
a path, bytes inside a CONNECT tunnel, the proxy password (right and wrong), the control-plane API
key (sent by the agent's lifecycle to a local endpoint that echoes it back in its answer) and the
path of the agent's key file. Failure paths are exercised too (502, 400, 407, a failing wake).
Afterwards no log line of either process contains any marker, and the logs are not empty.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths
from tests.faults.support import (
    FLUIDITY,
    Proc,
    fetch,
    free_port,
    wait_port,
    write_agent_config,
    write_server_config,
)
from tests.integration.origins import HttpOrigin
from tests.integration.stack import echo_handler, tcp_server

SECRETS = {
    "query": "Sq1-query-7f3a",
    "header": "Sh2-bearer-91c2",
    "cookie": "Sc3-cookie-55d0",
    "body": "Sb4-body-c0ffee",
    "path": "Sp5-path-beef",
    "tunnel": "St6-tunnel-d00d",
    "password": "Sw7-password-1234",
    "wrong_password": "Sx8-wrongpw-4321",
    "api_key": "Sk9-apikey-abcd",
    "key_path": "Sf0-keydir-e1e1",
}
SETTINGS = [("error", "text"), ("warning", "text"), ("info", "text"), ("info", "json")]


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def _basic(password: str) -> str:
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n"


async def _traffic(proxy_port: int, origin: HttpOrigin, echo_port: int) -> None:
    auth = _basic(SECRETS["password"])
    headers = auth + (
        f"Authorization: Bearer {SECRETS['header']}\r\nCookie: s={SECRETS['cookie']}\r\n"
    )
    url = origin.url(f"/echo/{SECRETS['path']}?token={SECRETS['query']}")
    ok = await fetch(proxy_port, url, headers=headers)
    assert ok.status == 200, ok
    body = f"secret={SECRETS['body']}".encode()
    reply = await _raw(proxy_port, (
        f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n{auth}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body)  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
    wrong = await fetch(proxy_port, url, headers=_basic(SECRETS["wrong_password"]))
    assert wrong.status == 407, wrong
    refused = await fetch(proxy_port, f"http://127.0.0.1:9/?q={SECRETS['query']}", headers=auth)
    assert refused.status == 502, refused
    bad = await _raw(proxy_port, (
        f"GET http://a.test/{SECRETS['path']}?k={SECRETS['query']} HTTP/1.1\r\nHost: a\r\n"
        f"X-Bad: \x00{SECRETS['header']}\r\n\r\n"
    ).encode())  # fmt: skip
    assert bad.startswith(b"HTTP/1.1 400"), bad[:100]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(SECRETS["tunnel"].encode())
    assert await reader.readexactly(len(SECRETS["tunnel"])) == SECRETS["tunnel"].encode()
    writer.close()


async def _run(
    level: str, fmt: str, pki: PkiPaths, directory: Path, *, origin: HttpOrigin, echo_port: int
) -> list[Proc]:
    directory.mkdir()
    key_dir = directory / SECRETS["key_path"]
    key_dir.mkdir()
    key = key_dir / "client.key"
    shutil.copy(pki.client_key, key)
    env = {"FLUIDITY_LOG_LEVEL": level, "FLUIDITY_LOG_FORMAT": fmt}
    server_port, proxy_port, waking_port = free_port(), free_port(), free_port()
    server = Proc(directory, "server", [*FLUIDITY, "server", "--config",
                  str(write_server_config(directory / "server.yaml", pki, server_port))],
                  env=env)  # fmt: skip
    agent_config = write_agent_config(
        directory / "agent.yaml", pki, server_port, proxy_port, key_file=f'"{key}"',
        proxy_auth=f'{{users: [{{username: alice, password: "{SECRETS["password"]}"}}]}}',
    )  # fmt: skip
    agent = Proc(directory, "agent", [*FLUIDITY, "agent", "--config", str(agent_config)], env=env)
    waking_config = write_agent_config(
        directory / "waking.yaml", pki, server_port, waking_port, key_file=f'"{key}"',
        lifecycle=(
            f'{{enabled: true, wake_api_endpoint: "{origin.url("/echo/wake")}", '
            f'api_key: "{SECRETS["api_key"]}", connection_timeout: 2s, '
            "connection_retry_interval: 500ms, connection_max_retries: 2}"
        ),
    )  # fmt: skip
    waking = Proc(directory, "waking", [*FLUIDITY, "agent", "--config", str(waking_config)],
                  env=env)  # fmt: skip
    procs = [server, agent, waking]
    server.start()
    await wait_port(server_port, server)
    agent.start()
    waking.start()
    await wait_port(proxy_port, agent)
    await wait_port(waking_port, waking)
    await _traffic(proxy_port, origin, echo_port)
    # The waking agent's control-plane calls carried the API key (the echo answer holds it).
    deadline = asyncio.get_running_loop().time() + 15
    while not any(r.header("x-api-key") for r in origin.requests):
        assert asyncio.get_running_loop().time() < deadline, "the lifecycle never called wake"
        await asyncio.sleep(0.1)
    await fetch(waking_port, origin.url(f"/echo?token={SECRETS['query']}"), timeout=15)
    for proc in procs:
        proc.signal(15)
    for proc in procs:
        await proc.wait_exit(20)
    return procs


@pytest.mark.timeout(120)
async def test_no_secret_appears_in_any_log_line_at_any_level_up_to_info(
    pki: PkiPaths, tmp_path: Path
) -> None:
    async with HttpOrigin() as origin, tcp_server(echo_handler) as echo_port:
        runs = await asyncio.gather(*(
            _run(level, fmt, pki, tmp_path / f"{level}-{fmt}", origin=origin, echo_port=echo_port)
            for level, fmt in SETTINGS
        ))  # fmt: skip
    assert any(SECRETS["api_key"] in v for r in origin.requests for _, v in r.headers)
    for (level, fmt), procs in zip(SETTINGS, runs, strict=True):
        for proc in procs:
            log = proc.log()
            lines = [line for line in log.splitlines() if not line.startswith("--- start")]
            if level == "info":
                assert lines, f"{proc.name} logged nothing at info: the check would be vacuous"
            for name, secret in SECRETS.items():
                leaks = [line for line in lines if secret in line]
                assert not leaks, f"{name} leaked into {proc.name}'s {level}/{fmt} log: {leaks}"
