"""Structured logging: stable event names with key=value fields, as text or JSON lines.

Call :func:`log` with an event name (``"link.up"``) and fields; the formatter renders
``2026-11-27T10:00:00Z INFO fluidity.agent link.up server=1.2.3.4:8443 rtt_ms=12`` or one JSON
object per line. Callers never pass secrets, bodies, header values or query strings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "fluidity_fields"
_EVENT = "fluidity_event"


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` (cheap when the level is disabled).

    The record's message is the text form (``event key=value ...``), so any handler, including
    pytest's, shows the fields; the JSON formatter uses the structured copy instead.
    """
    if logger.isEnabledFor(level):
        text = " ".join([event, *(f"{key}={_render(value)}" for key, value in fields.items())])
        logger.log(level, "%s", text, extra={_FIELDS: fields, _EVENT: event})


def _render(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> <event> key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.name,
                 record.getMessage()]  # fmt: skip
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``event`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, _EVENT, None) or record.getMessage(),
        }
        payload.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send Fluidity's logs to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("fluidity")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # asyncio logs every SSL handshake failure with a traceback; our own lines explain them.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
