"""Real event shapes: API Gateway REST proxy-integration requests, EventBridge scheduled events."""

from __future__ import annotations

import json
from typing import Any


def api_event(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    body: str | None = None,
    base64: bool = False,
) -> dict[str, Any]:
    """An API Gateway REST API proxy-integration event (payload format 1.0), as Lambda gets it."""
    all_headers = {
        "Accept": "*/*",
        "Host": "abc123.execute-api.us-east-1.amazonaws.com",
        "User-Agent": "fluidity-agent",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Port": "443",
        "X-Forwarded-Proto": "https",
        **(headers or {}),
    }
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": all_headers,
        "multiValueHeaders": {k: [v] for k, v in all_headers.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": (
            {k: [v] for k, v in query.items()} if query is not None else None
        ),
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": path,
            "httpMethod": method,
            "path": f"/prod{path}",
            "stage": "prod",
            "identity": {"sourceIp": "203.0.113.7", "apiKey": "api-gateway-key"},
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "accountId": "123456789012",
            "apiId": "abc123",
            "protocol": "HTTP/1.1",
        },
        "body": body,
        "isBase64Encoded": base64,
    }


def scheduled_event(rule: str = "fluidity-sleep") -> dict[str, Any]:
    """An EventBridge (CloudWatch Events) scheduled rule invocation."""
    return {
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-27T23:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:events:us-east-1:123456789012:rule/{rule}"],
        "detail": {},
    }


def body_of(response: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a proxy-integration response, after checking the response's shape."""
    assert set(response) == {"statusCode", "headers", "body"}
    assert response["headers"]["content-type"] == "application/json"
    assert isinstance(response["body"], str)
    assert "Traceback" not in response["body"]
    decoded = json.loads(response["body"])
    assert isinstance(decoded, dict)
    return decoded


def http_api_event(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: str | None = None
) -> dict[str, Any]:
    """An API Gateway HTTP API event (payload format 2.0): method under requestContext.http."""
    return {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"user-agent": "fluidity-agent", **(headers or {})},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": "fluidity-agent",
            },
            "requestId": "JKJaXmPLvHcESHA=",
            "routeKey": f"{method} {path}",
            "stage": "$default",
        },
        "body": body,
        "isBase64Encoded": False,
    }
