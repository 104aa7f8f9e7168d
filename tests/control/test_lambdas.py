"""The Lambda handlers and the ECS backend against moto in server mode, with real event shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fluidity.control import lambdas
from tests.awsfixtures import EcsScheduler, FargateService, aws_client

from .conftest import API_KEY, desired_count
from .events import api_event, body_of, http_api_event, scheduled_event

KEY = API_KEY


def call(handler: Any, event: Any) -> tuple[int, dict[str, Any]]:
    response = handler(event, None)
    return response["statusCode"], body_of(response)


AUTH = {"x-api-key": KEY}


def test_wake_starts_the_service_then_status_reports_the_task_public_ip(
    service: FargateService,
) -> None:
    status, body = call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    assert status == 200
    assert body == {
        "state": "starting",
        "desired": 1,
        "running": 0,
        "public_ip": None,
        "changed": True,
    }
    assert desired_count(service) == 1
    scheduler = EcsScheduler(service.endpoint, service, public_ip="127.0.0.1")
    [task] = scheduler.reconcile()
    status, body = call(lambdas.status_handler, api_event("GET", "/status", headers=AUTH))
    assert status == 200
    assert body["state"] == "running"
    assert body["running"] == 1
    assert body["public_ip"] == scheduler.public_ips[task] == "127.0.0.1"
    # A second wake finds it running and changes nothing.
    status, body = call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    assert (status, body["changed"], body["state"]) == (200, False, "running")


def test_the_public_ip_is_read_from_the_task_eni_whatever_moto_allocates(
    service: FargateService,
) -> None:
    call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    scheduler = EcsScheduler(service.endpoint, service)  # moto picks the address
    [task] = scheduler.reconcile()
    _, body = call(lambdas.status_handler, api_event("GET", "/status", headers=AUTH))
    assert body["public_ip"] == scheduler.public_ips[task]


def test_scheduled_kill_stops_a_running_service(service: FargateService) -> None:
    scheduler = EcsScheduler(service.endpoint, service)
    call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    scheduler.reconcile()
    status, body = call(lambdas.kill_handler, scheduled_event("fluidity-daily-kill"))
    assert status == 200
    assert body["changed"] is True
    assert body["action"] == "scaled_down"
    assert body["state"] == "stopping"  # the task still runs until the scheduler stops it
    assert desired_count(service) == 0
    assert scheduler.reconcile() == []
    _, body = call(lambdas.status_handler, api_event("GET", "/status", headers=AUTH))
    assert body["state"] == "stopped"
    assert body["public_ip"] is None


def test_wrong_or_missing_api_key_gets_403_and_changes_nothing(
    service: FargateService,
) -> None:
    for headers in ({"x-api-key": "wrong"}, {}, {"X-API-KEY": KEY[:-1]}):
        status, body = call(lambdas.wake_handler, api_event("POST", "/wake", headers=headers))
        assert status == 403
        assert body["error"] == "forbidden"
    assert desired_count(service) == 0
    # Header names are case-insensitive, as HTTP says.
    status, _ = call(lambdas.wake_handler, api_event("POST", "/wake", headers={"X-Api-Key": KEY}))
    assert status == 200


def test_api_key_can_come_from_secrets_manager(
    service: FargateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = aws_client("secretsmanager", service.endpoint)
    arn = secrets.create_secret(
        Name=f"fluidity/api-key-{service.service}", SecretString=json.dumps({"api_key": "s3cret"})
    )["ARN"]
    monkeypatch.delenv("API_KEY")
    monkeypatch.setenv("API_KEY_SECRET_ARN", arn)
    status, _ = call(lambdas.status_handler, api_event("GET", "/status", headers=AUTH))
    assert status == 403
    right = api_event("GET", "/status", headers={"x-api-key": "s3cret"})
    status, _ = call(lambdas.status_handler, right)
    assert status == 200


def test_an_unreadable_api_key_secret_is_a_502_and_changes_nothing(
    service: FargateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_KEY")
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:fluidity/no-such-key-AbCdEf"
    monkeypatch.setenv("API_KEY_SECRET_ARN", missing)
    status, body = call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    assert (status, body["error"]) == (502, "backend_error")
    assert "cannot read the API key secret" in body["reason"]
    assert desired_count(service) == 0  # fails closed: no key, no wake


def test_http_api_payload_2_events_are_answered_too(service: FargateService) -> None:
    status, body = call(lambdas.wake_handler, http_api_event("POST", "/wake", headers=AUTH))
    assert (status, body["state"], body["changed"]) == (200, "starting", True)
    status, body = call(lambdas.status_handler, http_api_event("GET", "/status"))
    assert (status, body["error"]) == (403, "forbidden")
    status, body = call(lambdas.status_handler, http_api_event("POST", "/status", headers=AUTH))
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert desired_count(service) == 1


def test_each_decision_is_one_json_log_line_with_its_evidence(service: FargateService) -> None:
    """As deployed (AWS_LAMBDA_FUNCTION_NAME set): JSON lines on stderr, no key in them."""
    import os
    import subprocess
    import sys
    import time

    call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    EcsScheduler(service.endpoint, service).reconcile()
    seen = time.time() - 5
    aws_client("cloudwatch", service.endpoint).put_metric_data(
        Namespace="Fluidity",
        MetricData=[
            {"MetricName": "LastActivityEpochSeconds", "Value": seen, "Unit": "Seconds",
             "Dimensions": [{"Name": "ClusterName", "Value": service.cluster},
                            {"Name": "ServiceName", "Value": service.service}]}
        ],
    )  # fmt: skip
    script = (
        "import json, sys, time\n"
        "from fluidity.control import lambdas\n"
        "event = json.loads(sys.argv[1])\n"
        "lambdas.status_handler(json.loads(sys.argv[2]), None)\n"
        "lambdas.clock = lambda: time.time() + 1200  # twenty minutes later\n"
        "print(json.dumps(lambdas.sleep_handler(event, None)))\n"
    )
    status_event = api_event("GET", "/status", headers=AUTH)
    env = {**os.environ, "AWS_LAMBDA_FUNCTION_NAME": "fluidity-sleep"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(scheduled_event()), json.dumps(status_event)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert body_of(json.loads(done.stdout))["action"] == "scaled_down"
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    [decision] = [line for line in lines if line["event"] == "control.sleep"]
    assert decision["level"] == "info"
    assert decision["action"] == "scaled_down"
    assert decision["last_activity"] == pytest.approx(seen, abs=1)
    assert decision["idle_seconds"] == pytest.approx(1205, abs=10)
    assert decision["threshold_seconds"] == 900.0
    assert "idle" in decision["reason"]
    responses = [line["status"] for line in lines if line["event"] == "lambda.response"]
    assert responses == [200, 200]
    assert KEY not in done.stderr
    assert desired_count(service) == 0


def test_release_stops_the_service_only_without_other_active_agents(
    service: FargateService,
) -> None:
    import time

    cloudwatch = aws_client("cloudwatch", service.endpoint)
    dims = [
        {"Name": "ClusterName", "Value": service.cluster},
        {"Name": "ServiceName", "Value": service.service},
    ]
    now = time.time()
    cloudwatch.put_metric_data(
        Namespace="Fluidity",
        MetricData=[
            {"MetricName": "AgentLastActivityEpochSeconds", "Value": now - 5, "Unit": "Seconds",
             "Dimensions": [*dims, {"Name": "AgentId", "Value": agent}]}
            for agent in ("laptop", "desktop")
        ],
    )  # fmt: skip
    call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    EcsScheduler(service.endpoint, service).reconcile()
    release = json.dumps({"mode": "release", "agent_id": "laptop"})
    status, body = call(
        lambdas.kill_handler, api_event("POST", "/kill", headers=AUTH, body=release)
    )
    assert status == 200
    assert body["action"] == "no_change"
    assert body["active_agents"] == ["desktop"]
    assert desired_count(service) == 1
    # The query form: "desktop" leaves while "laptop" is active: the server stays up too.
    query = {"only_if_idle": "true", "agent_id": "desktop"}
    status, body = call(lambdas.kill_handler, api_event("POST", "/kill", headers=AUTH, query=query))
    assert (status, body["action"]) == (200, "no_change")
    # An explicit kill always stops.
    status, body = call(lambdas.kill_handler, api_event("POST", "/kill", headers=AUTH))
    assert (status, body["action"], desired_count(service)) == (200, "scaled_down", 0)


MALFORMED = [
    ("not an object", ["POST", "/wake"], "must be a JSON object"),
    ("empty object", {}, "unrecognised event"),
    ("other EventBridge event", {"source": "aws.ec2", "detail-type": "EC2 Instance State"},
     "Scheduled Event"),
    ("method missing", {"httpMethod": None, "headers": {}}, "httpMethod"),
    ("headers not strings", {"httpMethod": "POST", "headers": {"x-api-key": 7}}, "headers"),
    ("body not a string", {"httpMethod": "POST", "headers": {}, "body": {"mode": "kill"}}, "body"),
    ("bad base64", {"httpMethod": "POST", "headers": {}, "body": "%%%", "isBase64Encoded": True},
     "base64"),
    ("HTTP API event, requestContext not an object", {"version": "2.0", "requestContext": "x"},
     "requestContext must be an object"),
    ("HTTP API event, http not an object", {"version": "2.0", "requestContext": {"http": []}},
     "requestContext.http must be an object"),
    ("HTTP API event without a method", {"version": "2.0", "requestContext": {"http": {}}},
     "httpMethod"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("event", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_events_get_400_with_a_reason(
    service: FargateService, event: Any, reason: str
) -> None:
    status, body = call(lambdas.kill_handler, event)
    assert status == 400
    assert body["error"] == "bad_event"
    assert reason in body["reason"]
    assert desired_count(service) == 0


BAD_REQUESTS = [
    ("body not JSON", {"body": "{mode: release"}, 400, "not valid JSON"),
    ("body not an object", {"body": "[1]"}, 400, "JSON object"),
    ("unknown mode", {"body": '{"mode": "explode"}'}, 400, "mode"),
    ("unknown field", {"body": '{"mode": "release", "force": true}'}, 400, "unknown field"),
    ("agent id not text", {"body": '{"mode": "release", "agent_id": 5}'}, 400, "agent_id"),
    ("only_if_idle not boolean", {"query": {"only_if_idle": "perhaps"}}, 400, "only_if_idle"),
    ("body too large", {"body": '{"agent_id": "' + "x" * 5000 + '"}'}, 413, "over"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("parts", "status", "reason"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_kill_requests_are_refused_with_a_reason_and_change_nothing(
    service: FargateService, parts: dict[str, Any], status: int, reason: str
) -> None:
    call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    got, body = call(lambdas.kill_handler, api_event("POST", "/kill", headers=AUTH, **parts))
    assert got == status
    assert reason in body["reason"]
    assert desired_count(service) == 1


def test_wrong_method_and_unscheduled_operations_are_refused(service: FargateService) -> None:
    status, body = call(lambdas.status_handler, api_event("POST", "/status", headers=AUTH))
    assert (status, body["error"]) == (405, "method_not_allowed")
    status, body = call(lambdas.wake_handler, scheduled_event())
    assert status == 400
    assert "not a scheduled operation" in body["reason"]
    assert desired_count(service) == 0


def test_misconfiguration_is_a_500_that_names_every_problem(
    service: FargateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLUSTER_NAME")
    monkeypatch.setenv("IDLE_THRESHOLD", "soon")
    monkeypatch.setenv("METRIC_LOOKBACK", "30s")
    monkeypatch.setenv("METRIC_NAMESPACE", "AWS/ECS")
    status, body = call(lambdas.sleep_handler, scheduled_event())
    assert (status, body["error"]) == (500, "misconfigured")
    for part in (
        "CLUSTER_NAME is not set",
        "IDLE_THRESHOLD='soon'",
        "METRIC_LOOKBACK must be",
        "METRIC_NAMESPACE='AWS/ECS'",
    ):
        assert part in body["reason"]


def test_unknown_service_is_a_502_naming_it(
    service: FargateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVICE_NAME", "no-such-service")
    status, body = call(lambdas.wake_handler, api_event("POST", "/wake", headers=AUTH))
    assert (status, body["error"]) == (502, "backend_error")
    assert "no-such-service" in body["reason"]
    assert "SERVICE_NAME" in body["reason"]


def test_the_lambda_handlers_import_only_the_standard_library_and_boto3() -> None:
    import subprocess
    import sys

    probe = (
        "import json, sys, fluidity.control.lambdas, fluidity.control.backends.ecs\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(roots & {'pydantic', 'yaml', 'cryptography', 'h11', 'rich', 'uvloop'}))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fluidity'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert set(json.loads(out[1])) <= {
        "fluidity",
        "fluidity.control",
        "fluidity.control.backends",
        "fluidity.control.backends.ecs",
        "fluidity.control.core",
        "fluidity.control.lambdas",
        "fluidity.control.operations",
        "fluidity.errors",
        "fluidity.logs",
    }
