"""AWS Lambda handlers: ``wake_handler``, ``sleep_handler``, ``kill_handler``, ``status_handler``.

Each is ``(event, context) -> dict`` and accepts an API Gateway **REST proxy-integration** event
(``httpMethod``, ``headers``, ``queryStringParameters``, ``body``, ``isBase64Encoded``; HTTP API
payload 2.0 works too) and answers a proxy-integration response: ``statusCode``, ``headers``
(``content-type: application/json``) and a JSON string ``body``. ``sleep_handler`` and
``kill_handler`` also accept EventBridge scheduled events (``"source": "aws.events"``,
``"detail-type": "Scheduled Event"``); the answer has the same shape. A malformed event gets 400
with a reason, a misconfigured function 500 with a reason, an AWS API failure 502; never a stack
trace in a response.

Configuration (environment, validated on each cold start; see docs/lambda.md):
``CLUSTER_NAME``, ``SERVICE_NAME`` (required), ``IDLE_THRESHOLD`` ("15m"), ``STARTUP_GRACE``
("5m"), ``RELEASE_WINDOW`` ("2m"), ``METRIC_NAMESPACE`` ("Fluidity"), ``METRIC_LOOKBACK`` ("30m"),
``API_KEY`` or ``API_KEY_SECRET_ARN`` (optional shared key checked against ``x-api-key`` in
constant time, in addition to API Gateway's own key), ``AWS_REGION`` (set by Lambda),
``AWS_ENDPOINT_URL`` (optional, boto3's own: tests point it at moto).

Imports only the standard library, boto3 and the project's stdlib-only modules.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluidity.control.core import BackendError, Controller, Policy
from fluidity.control.operations import Request, Response, error, handle, run
from fluidity.errors import ConfigError
from fluidity.logs import log, setup_logging

logger = logging.getLogger("fluidity.control")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9 .\-_/#:]{1,255}$")  # what CloudWatch accepts
SECRET_TTL = 300.0
"""Seconds a warm function keeps the key read from Secrets Manager before reading it again."""
_JSON = {"content-type": "application/json"}


def clock() -> float:
    """Unix time used by the decisions; tests replace this function to move time forward."""
    return time.time()


def _now() -> float:
    return clock()  # looked up at each call, so a replaced ``clock`` takes effect


def parse_duration(name: str, value: str) -> float:
    """Seconds from ``"90s"``, ``"15m"``, ``"250ms"``, ``"1h"`` or a bare number of seconds."""
    match = _DURATION.match(value)
    if not match:
        raise ConfigError(f"{name}={value!r} is not a duration: write it like 90s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Settings:
    """The function's configuration, from its environment variables."""

    cluster: str
    service: str
    policy: Policy
    namespace: str
    lookback: float
    region: str | None
    api_key: str | None
    api_key_secret_arn: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and validate; a :class:`ConfigError` lists every problem found."""
        problems: list[str] = []

        def name(var: str, default: str | None = None) -> str:
            value = env.get(var, default or "").strip()
            if not value:
                what = var.split("_", maxsplit=1)[0].lower()
                problems.append(f"{var} is not set: it must name the ECS {what}")
            elif not _NAME.match(value):
                problems.append(f"{var}={value[:40]!r}: letters, digits, - and _ only")
            return value

        def duration(var: str, default: str, minimum: float = 0.0) -> float:
            try:
                seconds = parse_duration(var, env.get(var, "").strip() or default)
            except ConfigError as exc:
                problems.append(str(exc))
                return 0.0
            if seconds < minimum:
                problems.append(f"{var} must be at least {minimum:g}s")
            return seconds

        cluster = name("CLUSTER_NAME")
        service = name("SERVICE_NAME")
        namespace = env.get("METRIC_NAMESPACE", "").strip() or "Fluidity"
        if not _NAMESPACE.match(namespace) or namespace.startswith("AWS/"):
            problems.append(
                f"METRIC_NAMESPACE={namespace[:40]!r}: up to 255 of letters, digits, space and "
                ". - _ / # : (not starting with AWS/); it must match the server's "
                "metrics_namespace"
            )
        policy = Policy(
            idle_threshold=duration("IDLE_THRESHOLD", "15m", 60.0),
            startup_grace=duration("STARTUP_GRACE", "5m"),
            release_window=duration("RELEASE_WINDOW", "2m"),
        )
        # The server re-publishes its last activity time every metrics_interval, so the lookback
        # only has to span a few intervals (not the idle threshold).
        lookback = duration("METRIC_LOOKBACK", "30m", 120.0)
        if problems:
            raise ConfigError("invalid Lambda configuration: " + "; ".join(problems))
        return cls(
            cluster=cluster,
            service=service,
            policy=policy,
            namespace=namespace,
            lookback=lookback,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            api_key=env.get("API_KEY") or None,
            api_key_secret_arn=env.get("API_KEY_SECRET_ARN") or None,
        )


class _Runtime:
    """What a warm function keeps between invocations: controller and shared key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._controller: Controller | None = None
        self._secret: tuple[str, float] | None = None

    def controller(self) -> tuple[Settings, Controller]:
        settings = Settings.from_env(os.environ)
        with self._lock:
            if self._controller is None or settings != self._settings:
                from fluidity.control.backends.ecs import EcsBackend

                backend = EcsBackend(
                    settings.cluster,
                    settings.service,
                    namespace=settings.namespace,
                    lookback=settings.lookback,
                    region=settings.region,
                )
                controller = Controller(backend, settings.policy, clock=_now)
                self._settings, self._controller = settings, controller
                self._secret = None
            return settings, self._controller

    def api_key(self, settings: Settings) -> str | None:
        if settings.api_key is not None:
            return settings.api_key
        arn = settings.api_key_secret_arn
        if arn is None:
            return None
        now = time.monotonic()
        if self._secret is not None and now - self._secret[1] < SECRET_TTL:
            return self._secret[0]
        key = _read_secret(arn, settings.region)
        self._secret = (key, now)
        return key


def _read_secret(arn: str, region: str | None) -> str:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = boto3.client("secretsmanager", region_name=region)
        value = client.get_secret_value(SecretId=arn).get("SecretString")
    except (BotoCoreError, ClientError) as exc:
        raise BackendError(f"cannot read the API key secret: {type(exc).__name__}") from None
    if not value:
        raise ConfigError("API_KEY_SECRET_ARN names a secret with no SecretString")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return str(value)
    if isinstance(parsed, dict):
        if not isinstance(parsed.get("api_key"), str):
            raise ConfigError('the API key secret is a JSON object without an "api_key" string')
        return str(parsed["api_key"])
    return str(value)


_RUNTIME = _Runtime()


def _reset_for_tests() -> None:
    """Forget the warm state (controller, cached secret), as a cold start would."""
    global _RUNTIME  # noqa: PLW0603
    _RUNTIME = _Runtime()


def wake_handler(event: Any, context: Any) -> dict[str, Any]:
    """``POST /wake``: desired count 1 if it was 0; state and public IP."""
    return _invoke("wake", event, scheduled_ok=False)


def status_handler(event: Any, context: Any) -> dict[str, Any]:
    """``GET /status``: state and public IP, changing nothing."""
    return _invoke("status", event, scheduled_ok=False)


def sleep_handler(event: Any, context: Any) -> dict[str, Any]:
    """Scheduled (or ``POST /sleep``): scale to 0 if idle for ``IDLE_THRESHOLD``."""
    return _invoke("sleep", event, scheduled_ok=True)


def kill_handler(event: Any, context: Any) -> dict[str, Any]:
    """Scheduled or ``POST /kill``: scale to 0 now; an agent's release only if others are idle."""
    return _invoke("kill", event, scheduled_ok=True)


def _invoke(operation: str, event: Any, *, scheduled_ok: bool) -> dict[str, Any]:
    if "AWS_LAMBDA_FUNCTION_NAME" in os.environ and not logging.getLogger("fluidity").handlers:
        setup_logging("info", "json")  # one JSON object a line in CloudWatch Logs
    started = time.monotonic()
    try:
        response = _dispatch(operation, event, scheduled_ok)
    except Exception as exc:  # the last line of defence: a reason, never a stack trace out
        logger.exception("control.internal_error operation=%s", operation)
        response = error(500, "internal_error", f"unexpected {type(exc).__name__}; see the log")
    log(logger, logging.INFO, "lambda.response", operation=operation, status=response.status,
        ms=round((time.monotonic() - started) * 1000))  # fmt: skip
    return {"statusCode": response.status, "headers": dict(_JSON), "body": response.body().decode()}


def _dispatch(operation: str, event: Any, scheduled_ok: bool) -> Response:
    try:
        kind = _kind(event)
        request = _request(event) if kind == "api" else None
    except ValueError as exc:
        log(logger, logging.WARNING, "lambda.bad_event", operation=operation, reason=str(exc))
        return error(400, "bad_event", str(exc))
    if kind == "scheduled" and not scheduled_ok:
        return error(400, "bad_event", f"{operation} is not a scheduled operation")
    try:
        settings, controller = _RUNTIME.controller()
        if request is None:
            return run(operation, controller)
        key = _RUNTIME.api_key(settings)
    except ConfigError as exc:
        log(logger, logging.ERROR, "lambda.misconfigured", reason=str(exc))
        return error(500, "misconfigured", str(exc))
    except BackendError as exc:
        return error(502, "backend_error", str(exc))
    return handle(operation, request, controller, key)


def _kind(event: Any) -> str:
    if not isinstance(event, dict):
        raise ValueError("the event must be a JSON object")
    if event.get("source") == "aws.events" or "detail-type" in event:
        if event.get("detail-type") != "Scheduled Event":
            raise ValueError(
                f"unsupported EventBridge event {str(event.get('detail-type'))[:40]!r}: "
                "expected a Scheduled Event"
            )
        return "scheduled"
    if "httpMethod" in event or event.get("version") == "2.0":
        return "api"
    raise ValueError(
        "unrecognised event: expected an API Gateway proxy request (httpMethod, headers, body) "
        "or an EventBridge Scheduled Event"
    )


def _strings(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} must be an object of strings")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


def _request(event: dict[str, Any]) -> Request:
    if event.get("version") == "2.0":
        context = _object(event.get("requestContext"), "requestContext")
        method = _object(context.get("http"), "requestContext.http").get("method")
    else:
        method = event.get("httpMethod")
    if not isinstance(method, str) or not method:
        raise ValueError("httpMethod must be a non-empty string")
    headers = {k.lower(): v for k, v in _strings(event.get("headers"), "headers").items()}
    query = _strings(event.get("queryStringParameters"), "queryStringParameters")
    body = event.get("body")
    if body is None:
        raw = b""
    elif not isinstance(body, str):
        raise ValueError("body must be a string or null")
    elif event.get("isBase64Encoded") is True:
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("body is marked isBase64Encoded but is not valid base64") from None
    else:
        raw = body.encode()
    return Request(method=method, query=query, headers=headers, body=raw)
