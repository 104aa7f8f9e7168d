"""HTTP requests onto controller operations, shared by the Lambda handlers and the local API.

``POST /wake``, ``POST /sleep``, ``POST /kill`` (optional JSON body ``{"mode": "release",
"agent_id": "laptop"}`` or query ``?only_if_idle=true[&agent_id=laptop]`` for an agent's release),
``GET /status``. The shared key, when configured, must arrive in ``x-api-key`` and is compared in
constant time. Every answer is a JSON object; errors carry ``error`` (a stable code) and ``reason``
(a sentence for a person). Standard library only: the Lambda package imports this module.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluidity.control.core import BackendError, Controller
from fluidity.logs import log

logger = logging.getLogger("fluidity.control")

OPERATIONS: dict[str, str] = {"wake": "POST", "sleep": "POST", "kill": "POST", "status": "GET"}
"""Operation name -> the HTTP method it answers to."""
MAX_BODY = 4096
"""Largest request body accepted (bytes): the only body is a small JSON object."""
MAX_AGENT_ID = 128
"""Longest agent id accepted (characters)."""
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request reduced to what the operations need. Header names are lower case."""

    method: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Release:
    """An agent's release (a kill only if no other agent is active); ``None``: any agent."""

    agent_id: str | None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    payload: dict[str, Any]

    def body(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":"), sort_keys=True).encode()


def error(status: int, code: str, reason: str) -> Response:
    return Response(status, {"error": code, "reason": reason})


def key_matches(supplied: str | None, expected: str) -> bool:
    """Constant-time comparison of the ``x-api-key`` header with the shared key."""
    return hmac.compare_digest((supplied or "").encode(), expected.encode())


def handle(
    operation: str, request: Request, controller: Controller, api_key: str | None
) -> Response:
    """Check method and key, parse the arguments, run ``operation``; never raises."""
    method = OPERATIONS.get(operation)
    if method is None:
        return error(404, "not_found", f"no operation {operation!r}: use {', '.join(OPERATIONS)}")
    if request.method.upper() != method:
        return error(
            405, "method_not_allowed", f"use {method} for /{operation}, not {request.method}"
        )
    if api_key is not None and not key_matches(request.headers.get("x-api-key"), api_key):
        log(logger, logging.WARNING, "control.forbidden", operation=operation,
            reason="missing or wrong x-api-key")  # fmt: skip
        return error(403, "forbidden", "missing or wrong x-api-key header")
    if len(request.body) > MAX_BODY:
        return error(413, "body_too_large", f"the request body is over {MAX_BODY} bytes")
    try:
        release = _release_arguments(request) if operation == "kill" else None
    except ValueError as exc:
        return error(400, "bad_request", str(exc))
    return run(operation, controller, release)


def run(operation: str, controller: Controller, release: Release | None = None) -> Response:
    """Run ``operation`` (``release`` given: an agent's release instead of a kill)."""
    try:
        if operation == "wake":
            payload = controller.wake()
        elif operation == "sleep":
            payload = controller.sleep()
        elif operation == "status":
            payload = controller.status()
        elif release is not None:
            payload = controller.release(release.agent_id)
        else:
            payload = controller.kill()
    except BackendError as exc:
        log(logger, logging.ERROR, "control.backend_error", operation=operation, reason=str(exc))
        return error(502, "backend_error", str(exc))
    return Response(200, payload)


def _release_arguments(request: Request) -> Release | None:
    """A :class:`Release`, or ``None`` for a plain kill; ValueError says what is wrong."""
    only_if_idle = request.query.get("only_if_idle", "").strip().lower()
    if only_if_idle not in _TRUE | _FALSE:
        raise ValueError(f"only_if_idle must be true or false, got {only_if_idle[:20]!r}")
    agent_id: object = request.query.get("agent_id")
    release = only_if_idle in _TRUE
    if request.body.strip():
        try:
            body = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError('the body must be a JSON object like {"mode": "release"}')
        unknown = sorted(set(body) - {"mode", "agent_id"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}: expected mode and agent_id")
        mode = body.get("mode", "kill")
        if mode not in ("kill", "release"):
            raise ValueError(f'mode must be "kill" or "release", got {str(mode)[:20]!r}')
        release = release or mode == "release"
        agent_id = body.get("agent_id", agent_id)
    if agent_id is not None:
        if not isinstance(agent_id, str) or not 0 < len(agent_id) <= MAX_AGENT_ID:
            raise ValueError(f"agent_id must be a string of 1 to {MAX_AGENT_ID} characters")
        if not agent_id.isprintable():
            raise ValueError("agent_id must be printable text")
    return Release(agent_id) if release else None
