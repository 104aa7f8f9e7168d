"""The agent's calls to the control plane (``POST /wake``, ``GET /status``, ``POST /kill``).

One attempt per call, in a worker thread (urllib), bounded by ``lifecycle.request_timeout`` and
``MAX_RESPONSE``; :class:`ControlApiError` says what went wrong and whether retrying can help. The
retry policy lives in :mod:`fluidity.agent.lifecycle`.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from fluidity.config import AgentConfig, LifecycleConfig
from fluidity.errors import ConfigError

MAX_RESPONSE = 64 * 1024
"""Largest control-API answer read (bytes)."""


def control_api_opener(config: AgentConfig) -> urllib.request.OpenerDirector:
    """An opener using ``upstream_proxy`` or the environment's proxies, never this agent."""
    if config.upstream_proxy and config.upstream_proxy.startswith("http://"):
        proxies = {"http": config.upstream_proxy, "https": config.upstream_proxy}
    else:
        own = {("127.0.0.1", config.local_proxy_port), ("localhost", config.local_proxy_port),
               (config.local_proxy_addr, config.local_proxy_port)}  # fmt: skip
        proxies = {}
        for scheme, url in urllib.request.getproxies().items():
            parts = urlsplit(url if "://" in url else f"http://{url}")
            try:
                port = parts.port
            except ValueError:
                continue
            if (parts.hostname, port) not in own:
                proxies[scheme] = url
    return urllib.request.build_opener(urllib.request.ProxyHandler(proxies))


class ControlApiError(Exception):
    """A control-API call failed; ``permanent`` when retrying cannot help (403, 404, 400...)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _status_url(config: LifecycleConfig) -> str | None:
    if config.status_api_endpoint:
        return config.status_api_endpoint
    wake = config.wake_api_endpoint or ""
    head, sep, tail = wake.rpartition("/wake")
    return f"{head}/status{tail}" if sep and not tail.strip("/") else None


def _check_url(name: str, url: str | None) -> None:
    if url is not None and not url.startswith(("https://", "http://")):
        raise ConfigError(f"lifecycle.{name} must be an http:// or https:// URL, got {url[:60]!r}")


class ControlClient:
    """The three control-API calls the agent makes, each one attempt, in a worker thread."""

    def __init__(
        self, config: LifecycleConfig, opener: urllib.request.OpenerDirector | None = None
    ) -> None:
        self._opener = opener or urllib.request.build_opener()
        if not config.wake_api_endpoint:
            raise ConfigError(
                "lifecycle.enabled needs lifecycle.wake_api_endpoint (the URL of POST /wake, e.g. "
                "https://xxx.execute-api.us-east-1.amazonaws.com/prod/wake)"
            )
        self.wake_url = config.wake_api_endpoint
        self.status_url = _status_url(config)
        if self.status_url is None:
            raise ConfigError(
                "lifecycle.status_api_endpoint is not set and cannot be derived: "
                "wake_api_endpoint does not end in /wake"
            )
        self.kill_url = config.kill_api_endpoint
        for name, url in (("wake_api_endpoint", self.wake_url),
                          ("status_api_endpoint", self.status_url),
                          ("kill_api_endpoint", self.kill_url)):  # fmt: skip
            _check_url(name, url)
        self.api_key = config.api_key
        self.timeout = config.request_timeout

    async def wake(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, "POST", self.wake_url, None)

    async def status(self) -> dict[str, Any]:
        assert self.status_url is not None
        return await asyncio.to_thread(self._call, "GET", self.status_url, None)

    async def release(self, agent_id: str, mode: str) -> dict[str, Any]:
        if not self.kill_url:
            raise ControlApiError("lifecycle.kill_api_endpoint is not set", permanent=True)
        body = {"mode": mode, "agent_id": agent_id} if mode == "release" else {"mode": "kill"}
        return await asyncio.to_thread(self._call, "POST", self.kill_url, body)

    def _call(self, method: str, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("content-type", "application/json")
        request.add_header("user-agent", "fluidity-agent")
        if self.api_key:
            request.add_header("x-api-key", self.api_key)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ControlApiError(f"control API unreachable: {reason}") from None
        try:
            document = json.loads(raw)
        except ValueError:
            raise ControlApiError("control API answered something that is not JSON") from None
        if not isinstance(document, dict):
            raise ControlApiError("control API answered JSON that is not an object")
        return document


def _http_error(exc: urllib.error.HTTPError) -> ControlApiError:
    try:
        reason = str(json.loads(exc.read(MAX_RESPONSE)).get("reason", ""))[:200]
    except (ValueError, AttributeError, OSError):
        reason = ""
    hint = {
        403: "the control API refused the key: check lifecycle.api_key",
        404: "no such control-API URL: check the lifecycle endpoints",
    }.get(exc.code, f"control API answered {exc.code}")
    text = f"{hint} ({reason})" if reason else hint
    return ControlApiError(text, permanent=400 <= exc.code < 500 and exc.code != 429)
