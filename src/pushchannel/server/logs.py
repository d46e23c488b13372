"""Structured log lines: one per subscription opened or closed, per auth failure, per error.

``pushchannel serve --log-format text|json`` picks the shape; the fields are the same. Fields
travel as the ``extra`` of a log record, so any ``logging`` call can add them::

    log.info("subscription opened", extra={"event": "subscription_opened", "channel": "a"})

    text: 2025-01-02T03:04:05.678Z INFO pushchannel.connections subscription opened event=... channel=a
    json: {"time": "2025-01-02T03:04:05.678Z", "level": "info", "logger": "...", "msg": "...", ...}

Never logged: payloads, attributes, bearer tokens (a token shows by its configured name only).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pushchannel.core.hooks import BrokerHooks
from pushchannel.core.subscription import Subscription

__all__ = [
    "ConnectionLog",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_auth_failure",
    "redact_url",
]

connections_log = logging.getLogger("pushchannel.connections")
auth_log = logging.getLogger("pushchannel.auth")

# Attributes every LogRecord has: whatever else a record carries came in as ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, _plain(value))
        if record.exc_info and record.exc_info[1] is not None:
            out.setdefault("error", str(record.exc_info[1]))
            out["error_type"] = type(record.exc_info[1]).__name__
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER message key=value ...``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        for key, value in _fields(record).items():
            text = str(_plain(value))
            if not text or any(c in text for c in ' "=\n\t'):
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so that a second call replaces it."""


def configure_logging(
    fmt: Literal["text", "json"] = "text", level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as text or JSON lines; idempotent."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def redact_url(url: str) -> str:
    """``url`` without a password, fit for a log line."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def log_auth_failure(
    peer: str,
    method: str,
    reason: str,
    *,
    code: Literal["UNAUTHENTICATED", "PERMISSION_DENIED"] = "UNAUTHENTICATED",
    token_name: str = "",
    channel: str = "",
) -> None:
    """One warning line for a refused call. Pass the token's configured name, never the token."""
    fields: dict[str, object] = {"event": "auth_failed", "code": code, "peer": peer, "method": method}
    if token_name:
        fields["token_name"] = token_name
    if channel:
        fields["channel"] = channel
    fields["reason"] = reason
    auth_log.warning("auth failed", extra=fields)


def _mode(sub: Subscription) -> str:
    return "broadcast" if sub.broadcast else "queue"


class ConnectionLog(BrokerHooks):
    """A broker hook: one line per subscription opened and closed."""

    __slots__ = ()

    def on_subscribe(self, sub: Subscription) -> None:
        connections_log.info(
            "subscription opened",
            extra={
                "event": "subscription_opened",
                "consumer": sub.id,
                "peer": sub.peer,
                "channel": sub.channel,
                "group": sub.group,
                "mode": _mode(sub),
                "max_in_flight": sub.max_in_flight,
            },
        )

    def on_unsubscribe(self, sub: Subscription) -> None:
        connections_log.info(
            "subscription closed",
            extra={
                "event": "subscription_closed",
                "consumer": sub.id,
                "peer": sub.peer,
                "channel": sub.channel,
                "group": sub.group,
                "mode": _mode(sub),
                "duration_s": round(max(0.0, time.time() - sub.since), 3),
                "reason": str(sub.error) if sub.error is not None else "stream ended",
            },
        )
