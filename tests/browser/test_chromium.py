"""A real browser end to end: headless Chromium (Debian's) driven by Playwright, through the agent.

Chromium loads an HTTPS page from a local TLS origin through the agent (``--proxy-server``, with
loopback proxied too: ``--proxy-bypass-list=<-loopback>``); the page fetches a JSON resource,
opens a secure WebSocket, echoes a message and writes both results into the page. Chromium
trusts the origin's certificate through its SPKI allow-list flag (the hash of the origin's
public key), nothing else. The test asserts the page's final text, that the traffic really went
through the tunnel, and saves a screenshot to test-artifacts/. It also loads the agent's own
status page.

``make test`` installs Debian's ``chromium`` when it is missing; without it the test is skipped
with that hint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from fluidity.certs import PkiPaths
from tests.integration.origins import make_certificates
from tests.integration.stack import running_server
from tests.integration.test_agent import running_agent

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
MESSAGE = "hello through the tunnel"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Fluidity end to end</title>
<style>body{font:16px sans-serif;margin:2em} .ok{color:#070} .bad{color:#a00}</style></head>
<body><h1>Fluidity: a browser through the tunnel</h1>
<p id="json">json: pending</p><p id="ws">websocket: pending</p><p id="done"></p>
<script>
const show = (id, text, ok) => { const e = document.getElementById(id);
  e.textContent = text; e.className = ok ? "ok" : "bad"; };
(async () => {
  try {
    const answer = await (await fetch("/data.json")).json();
    show("json", "json: " + answer.message + " #" + answer.number, true);
  } catch (error) { show("json", "json: failed " + error, false); }
  await new Promise((resolve) => {
    const ws = new WebSocket("wss://" + location.host + "/echo");
    ws.onopen = () => ws.send("MESSAGE");
    ws.onmessage = (event) => {
      show("ws", "websocket: " + event.data, true); ws.close(); resolve(); };
    ws.onerror = () => { show("ws", "websocket: failed", false); resolve(); };
  });
  document.getElementById("done").textContent = "done";
})();
</script></body></html>
""".replace("MESSAGE", MESSAGE)


def spki_hash(cert_path: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)): what --ignore-certificate-errors-spki-list takes."""
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@asynccontextmanager
async def page_origin(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """An HTTPS + WSS origin on 127.0.0.1: ``/`` (the page), ``/data.json``, ``/echo`` (WS)."""
    certificates = make_certificates(tmp_path)

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    def respond(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/echo":
            return None  # the WebSocket handshake proceeds
        if request.path == "/data.json":
            body = json.dumps({"message": "json through the tunnel", "number": 42}).encode()
            kind = "application/json"
        elif request.path == "/":
            body, kind = PAGE.encode(), "text/html; charset=utf-8"
        else:
            return connection.respond(404, "not found\n")
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body)))])
        return Response(200, "OK", headers, body)

    async with serve(
        echo, "127.0.0.1", 0, ssl=certificates.server_context(), process_request=respond
    ) as server:
        yield int(server.sockets[0].getsockname()[1]), certificates.cert_path


@pytest.mark.timeout(180)
async def test_chromium_through_the_agent_loads_https_json_and_websocket(
    pki: PkiPaths, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: `make test` installs it")
    playwright_api = pytest.importorskip("playwright.async_api")
    ARTIFACTS.mkdir(exist_ok=True)
    async with (
        page_origin(tmp_path) as (origin_port, origin_cert),
        running_server(pki) as server,
        running_agent(pki, server.port) as agent,
        playwright_api.async_playwright() as playwright,
    ):
        assert await agent.tunnel.wait_connected(10)
        profile = tmp_path / "chromium-profile"  # fresh for this run
        browser = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                *FLAGS,
                f"--proxy-server=http://127.0.0.1:{agent.proxy_port}",
                "--proxy-bypass-list=<-loopback>",  # Chromium skips proxies for loopback otherwise
                f"--ignore-certificate-errors-spki-list={spki_hash(origin_cert)}",
            ],
        )
        try:
            page = await browser.new_page()
            response = await page.goto(f"https://127.0.0.1:{origin_port}/", timeout=30_000)
            assert response is not None and response.ok, response
            await page.wait_for_function(
                "document.getElementById('done').textContent === 'done'", timeout=30_000
            )
            text = await page.inner_text("body")
            await page.screenshot(path=str(ARTIFACTS / "browser-e2e.png"), full_page=True)

            status_page = await page.goto(f"http://127.0.0.1:{agent.proxy_port}/", timeout=30_000)
            assert status_page is not None
            status_text = await page.inner_text("body")
            await page.screenshot(path=str(ARTIFACTS / "browser-agent-status.png"), full_page=True)
        finally:
            await browser.close()
        opened = server.stats.snapshot().streams_opened
    assert "json: json through the tunnel #42" in text, text
    assert f"websocket: {MESSAGE}" in text, text
    assert opened >= 1, "the page did not come through the tunnel"
    if status_page.status == 200:
        assert "fluidity" in status_text.lower(), status_text
    else:  # no status page in this build: the proxy explains itself instead
        assert status_page.status == 400 and "proxy" in status_text, status_text
    shutil.rmtree(profile, ignore_errors=True)
