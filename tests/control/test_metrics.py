"""Server metrics: the CloudWatch emitter publishes to moto, the Lambdas read them back and decide;
failures never reach the data path; the admin endpoint serves Prometheus text and JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fluidity.agent.tunnel import Tunnel
from fluidity.certs import PkiPaths
from fluidity.control import lambdas
from fluidity.server.listener import Server
from fluidity.server.metrics import AdminEndpoint, CloudWatchEmitter, ServerMetrics
from tests.awsfixtures import EcsScheduler, FargateService, aws_client
from tests.integration.stack import echo_handler, running_server, running_tunnel, tcp_server

from .conftest import API_KEY, desired_count
from .events import api_event, body_of, scheduled_event

AGENT = "fluidity-client"  # the CN of the session PKI's client certificate


def dimensions(svc: FargateService) -> list[dict[str, str]]:
    return [
        {"Name": "ClusterName", "Value": svc.cluster},
        {"Name": "ServiceName", "Value": svc.service},
    ]


def metric_values(svc: FargateService, name: str, stat: str, extra: Any = ()) -> list[float]:
    cloudwatch = aws_client("cloudwatch", svc.endpoint)
    now = datetime.now(UTC)
    result = cloudwatch.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "Fluidity",
                        "MetricName": name,
                        "Dimensions": [*dimensions(svc), *extra],
                    },
                    "Period": 60,
                    "Stat": stat,
                },
            }
        ],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=1),
    )
    return [float(v) for v in result["MetricDataResults"][0]["Values"]]


async def echo_once(tunnel: Tunnel, port: int, payload: bytes = b"ping") -> bytes:
    stream = await tunnel.open("127.0.0.1", port)
    await stream.wait_open()
    stream.write(payload)
    stream.write_eof()
    chunks = []
    while chunk := await stream.read():
        chunks.append(chunk)
    return b"".join(chunks)


def emitter_for(server: Server, svc: FargateService, **kwargs: Any) -> CloudWatchEmitter:
    metrics = ServerMetrics(server.stats, lambda: server.links)
    factory = kwargs.pop("client_factory", lambda: aws_client("cloudwatch", svc.endpoint))
    return CloudWatchEmitter(
        metrics,
        namespace="Fluidity",
        cluster=svc.cluster,
        service=svc.service,
        interval=kwargs.pop("interval", 60.0),
        client_factory=factory,
    )


def call(handler: Any, event: Any) -> dict[str, Any]:
    response = handler(event, None)
    assert response["statusCode"] == 200, response
    return body_of(response)


async def test_emitted_metrics_drive_the_sleep_and_release_decisions(
    pki: PkiPaths, service: FargateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = {"x-api-key": API_KEY}
    call(lambdas.wake_handler, api_event("POST", "/wake", headers=auth))
    EcsScheduler(service.endpoint, service).reconcile()
    async with (
        running_server(pki) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as port,
    ):
        assert await echo_once(tunnel, port, b"x" * 1000) == b"x" * 1000
        emitter = emitter_for(server, service)
        assert await emitter.publish_once()
        last_activity = server.stats.snapshot().last_activity

        assert metric_values(service, "StreamsOpened", "Sum") == [1.0]
        assert metric_values(service, "BytesIn", "Sum") == [1000.0]
        assert metric_values(service, "ActiveConnections", "Maximum") == [1.0]
        agent_dim = [{"Name": "AgentId", "Value": AGENT}]
        [agent_seen] = metric_values(service, "AgentLastActivityEpochSeconds", "Maximum", agent_dim)
        assert abs(agent_seen - last_activity) < 2

        # Another agent leaving does not stop a server this agent is using.
        leave = json.dumps({"mode": "release", "agent_id": "laptop-2"})
        body = call(lambdas.kill_handler, api_event("POST", "/kill", headers=auth, body=leave))
        assert (body["action"], body["active_agents"]) == ("no_change", [AGENT])

        # Five minutes later (clock injected): still active. Twenty: asleep.
        monkeypatch.setattr(lambdas, "clock", lambda: time.time() + 300)
        body = call(lambdas.sleep_handler, scheduled_event())
        assert body["action"] == "no_change"
        assert "active" in body["reason"]
        assert body["last_activity"] == pytest.approx(last_activity, abs=1)
        monkeypatch.setattr(lambdas, "clock", lambda: time.time() + 1200)
        body = call(lambdas.sleep_handler, scheduled_event())
    assert body["action"] == "scaled_down"
    assert body["idle_seconds"] == pytest.approx(1200, abs=10)
    assert body["threshold_seconds"] == 900
    assert body["last_activity"] == pytest.approx(last_activity, abs=1)
    assert desired_count(service) == 0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_publish_failures_are_logged_once_retried_and_never_block_traffic(
    pki: PkiPaths, service: FargateService, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    caplog.set_level(logging.DEBUG, logger="fluidity.server.metrics")
    async with (
        running_server(pki) as server,
        running_tunnel(pki, server.port) as tunnel,
        tcp_server(echo_handler) as port,
    ):
        emitter = emitter_for(
            server, service, interval=1.0, client_factory=lambda: aws_client("cloudwatch", dead)
        )
        emitter.start()
        try:
            for _ in range(200):  # bounded: the retries run in the background
                assert await echo_once(tunnel, port) == b"ping"
                if emitter.failures >= 2:
                    break
                await asyncio.sleep(0.05)
            assert emitter.failures >= 2
            assert emitter.publishes == 0
        finally:
            await emitter.stop()
        failed = [r for r in caplog.records if "metrics.publish_failed" in r.getMessage()]
        assert [r.levelno for r in failed][:2] == [logging.WARNING, logging.DEBUG]
        assert "EndpointConnectionError" in failed[0].getMessage()
        opened = server.stats.snapshot().streams_opened
        # AWS is back: the counts the failed publishes could not deliver go out with this one.
        emitter._client = aws_client("cloudwatch", service.endpoint)
        assert await emitter.publish_once()
    assert any("metrics.publish_recovered" in r.getMessage() for r in caplog.records)
    assert metric_values(service, "StreamsOpened", "Sum") == [float(opened)]


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_admin_endpoint_serves_prometheus_text_and_json_status(pki: PkiPaths) -> None:
    async with (
        running_server(pki) as server,
        tcp_server(echo_handler) as port,
    ):
        metrics = ServerMetrics(server.stats, lambda: server.links)
        admin = AdminEndpoint(metrics, "127.0.0.1", 0)
        await admin.start()
        try:
            async with running_tunnel(pki, server.port) as tunnel:
                status, body = await http_get(admin.port, "/status")
                assert status == 200
                document = json.loads(body)
                # Connected, keepalives only: not activity.
                assert document["agents"] == {}
                assert document["last_activity"] is None
                await echo_once(tunnel, port)
                status, text = await http_get(admin.port, "/metrics")
                assert status == 200
                assert b"fluidity_streams_opened_total 1\n" in text
                assert b"fluidity_active_connections 1\n" in text
                assert f'agent_last_activity_timestamp_seconds{{agent="{AGENT}"}}'.encode() in text
                document = json.loads((await http_get(admin.port, "/status"))[1])
                assert list(document["agents"]) == [AGENT]
                assert document["bytes_in"] == 4
            for _ in range(100):  # the server notices the closed link asynchronously
                document = json.loads((await http_get(admin.port, "/status"))[1])
                if document["active_connections"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert document["agents"] == {}  # an agent that left keeps nobody's server up
            assert (await http_get(admin.port, "/status", "POST"))[0] == 405
            assert (await http_get(admin.port, "/nothing"))[0] == 404
        finally:
            await admin.close()


async def test_connect_and_websocket_traffic_count_as_activity_keepalive_pings_do_not(
    pki: PkiPaths,
) -> None:
    from websockets.asyncio.client import connect

    from fluidity.agent.app import Agent
    from fluidity.config import AgentConfig
    from tests.integration.origins import WebSocketEchoOrigin
    from tests.integration.stack import tunnel_config

    async with (
        running_server(pki) as server,
        tcp_server(echo_handler) as echo_port,
        WebSocketEchoOrigin() as ws_origin,
    ):
        metrics = ServerMetrics(server.stats, lambda: server.links)
        config = AgentConfig(
            server_ip="127.0.0.1",
            server_port=server.port,
            local_proxy_port=0,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
            ca_cert_file=pki.ca_cert,
            tunnel=tunnel_config(keepalive_interval=0.05),
        )
        agent = Agent(config)
        await agent.start()
        try:
            # Connected and answering PINGs: idle.
            for _ in range(200):  # bounded: about 10 s
                if any(link.rtt_ms is not None for link in agent.tunnel.links):
                    break
                await asyncio.sleep(0.05)
            assert any(link.rtt_ms is not None for link in agent.tunnel.links), "no PONG yet"
            idle = metrics.status()
            assert (idle["active_connections"], idle["streams_opened"]) == (1, 0)
            assert (idle["last_activity"], idle["agents"]) == (None, {})

            # A CONNECT tunnel is a stream: activity, dated, and this agent's.
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.proxy_port)
            target = f"127.0.0.1:{echo_port}"
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            after_connect = metrics.status()
            assert after_connect["streams_opened"] == 1
            assert after_connect["last_activity"] is not None
            assert list(after_connect["agents"]) == [AGENT]

            # A WebSocket (the websockets client through the proxy): messages on the open
            # stream move the activity time on, with no new stream.
            proxy = f"http://127.0.0.1:{agent.proxy_port}"
            async with connect(ws_origin.uri("/"), proxy=proxy) as ws:
                await ws.send("first")
                assert await ws.recv() == "first"
                first = metrics.status()
                await asyncio.sleep(0.05)
                await ws.send("second")
                assert await ws.recv() == "second"
                second = metrics.status()
            assert first["streams_opened"] == second["streams_opened"] == 2
            assert second["bytes_in"] > first["bytes_in"] > after_connect["bytes_in"]
            assert second["last_activity"] > first["last_activity"]
            assert second["agents"][AGENT] > first["agents"][AGENT]
        finally:
            await agent.stop(grace=0)


def test_server_process_publishes_metrics_when_emit_metrics_is_on(
    pki: PkiPaths, service: FargateService, tmp_path: Path
) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        "listen_addr: 127.0.0.1\n"
        "listen_port: 0\n"
        f"cert_file: {pki.server_cert}\nkey_file: {pki.server_key}\nca_cert_file: {pki.ca_cert}\n"
        "emit_metrics: true\n"
        'metrics_interval: "1s"\n'
    )
    env = {
        **os.environ,  # the moto endpoint and fake credentials (aws_env)
        "FLUIDITY_CLUSTER_NAME": service.cluster,
        "FLUIDITY_SERVICE_NAME": service.service,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "fluidity", "server", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        values: list[float] = []
        for _ in range(100):  # bounded: about 10 s
            values = metric_values(service, "LastActivityEpochSeconds", "Maximum")
            if values or server.poll() is not None:
                break
            time.sleep(0.1)
        assert values, "no LastActivityEpochSeconds datapoint from the server process"
        assert abs(values[0] - time.time()) < 60  # nothing tunnelled: its start time
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=15)
    assert server.returncode == 0, stderr.decode()
    assert b"metrics.emitting" in stderr
