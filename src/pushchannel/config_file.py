"""The broker's TOML config file (``pushchannel serve --config FILE``), read with the stdlib.

A wrong key or value stops start-up with the file, the line and what was expected. Flags
override the file; the environment overrides neither. Durations are seconds or strings such as
``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``; sizes are bytes or strings such as ``"512KiB"``,
``"1GiB"``. See docs/operations.md for every key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pushchannel.config import Limits, ServerConfig
from pushchannel.core.model import ChannelPolicy, PolicyRule

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 10**6,
    "MiB": 1 << 20,
    "GB": 10**9,
    "GiB": 1 << 30,
}

_SERVER_KEYS: dict[str, Any] = {
    "listen": "address",
    "store": str,
    "fsync": ("normal", "full"),
    "grace": "duration",
    "metrics_listen": "address",
    "log_format": ("text", "json"),
}
_DELIVERY_KEYS = {
    "max_delivery_attempts": int,
    "ack_deadline": "duration",
    "max_in_flight": int,
    "heartbeat_interval": "duration",
    "seed_max_in_flight": int,
    "retention_interval": "duration",
}
_POLICY_KEYS = {
    "max_age": "duration",
    "max_messages": int,
    "max_bytes": "size",
    "discard": str,
    "dedupe_window": "duration",
    "default_group": bool,
}
_LIMIT_KEYS = {f.name: ("size" if f.name == "max_payload" else int) for f in fields(Limits)}
_LIMIT_KEYS.update({"max_ack_deadline": "duration", "max_ttl": "duration"})
_SERVER_KEYS.update({"max_concurrent_streams": int, "max_metadata_size": "size"})
_TLS_KEYS = {"cert": str, "key": str, "client_ca": str}  # [tls]: paths relative to the file
_AUTH_KEYS = {"file": str, "insecure": bool}  # [auth]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, line and expectation."""


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration: seconds or a string like '30s', '5m', '7d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("a duration: seconds or a string like '30s', '5m', '7d'")


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError("a size: bytes or a string like '512KiB', '1GiB'")


def _convert(kind: object, value: object) -> Any:
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        return parse_size(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("a whole number")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("a string")
        return value
    if kind == "address":
        host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("an address 'HOST:PORT', such as '127.0.0.1:9464'")
        return value
    if isinstance(kind, tuple):  # one of a few words
        if value not in kind:
            raise ValueError("one of " + ", ".join(repr(k) for k in kind))
        return value
    raise AssertionError(kind)


class _Reader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, section: str | None, key: str, index: int = 0) -> int:
        """Best effort: the line where ``key`` is set within ``section`` (its index-th table)."""
        current: str | None = None
        seen = -1
        for n, raw in enumerate(self.lines, 1):
            line = raw.strip()
            if line.startswith("["):
                current = line.strip("[] ")
                if current == section:
                    seen += 1
                continue
            if (
                current == section
                and (section is None or seen == index)
                and re.match(rf"{re.escape(key)}\s*=", line)
            ):
                return n
        return 0

    def error(self, section: str | None, key: str, expected: str, index: int = 0) -> ConfigError:
        line = self.line_of(section, key, index)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = f"{section}.{key}" if section else key
        return ConfigError(f"{where}: {name}: expected {expected}")

    def table(
        self, data: dict[str, Any], section: str | None, keys: dict[str, Any], index: int = 0
    ) -> dict[str, Any]:
        if not isinstance(data, dict):  # e.g. `delivery = 5` or `[[delivery]]`
            line = next((n for n, raw in enumerate(self.lines, 1) if section and section in raw), 0)
            where = f"{self.path}:{line}" if line else str(self.path)
            raise ConfigError(f"{where}: {section}: expected a table, [{section}]")
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key not in keys:
                known = ", ".join(sorted(keys))
                raise self.error(section, key, f"one of the known keys ({known}), not {key!r}", index)
            try:
                out[key] = _convert(keys[key], value)
            except ValueError as exc:
                raise self.error(section, key, str(exc), index) from None
        return out


def _policy(base: ChannelPolicy, values: dict[str, Any]) -> ChannelPolicy:
    if "discard" in values and values["discard"] not in ("drop-oldest", "reject"):
        raise ValueError("discard: expected 'drop-oldest' or 'reject'")
    return replace(base, **values)


def _security(r: _Reader, data: dict[str, Any], path: Path) -> dict[str, Any]:
    """[tls] cert/key/client_ca and [auth] file/insecure, as ServerConfig fields; relative
    paths are relative to the config file's directory."""
    tls = r.table(data.get("tls", {}), "tls", _TLS_KEYS)
    auth = r.table(data.get("auth", {}), "auth", _AUTH_KEYS)
    out: dict[str, Any] = {f"tls_{k}": str(path.parent / v) for k, v in tls.items()}
    if "file" in auth:
        out["auth_file"] = str(path.parent / auth["file"])
    if "insecure" in auth:
        out["insecure"] = auth["insecure"]
    return out


def load(path: str | Path, base: ServerConfig | None = None) -> ServerConfig:
    """Read ``path`` over ``base`` (defaults); ConfigError says what is wrong and where."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    r = _Reader(path, text)
    cfg = base or ServerConfig()
    sections = {"delivery", "retention", "limits", "channel", "tls", "auth"}
    top = {k: v for k, v in data.items() if k not in sections}
    server = r.table(top, None, _SERVER_KEYS)
    delivery = r.table(data.get("delivery", {}), "delivery", _DELIVERY_KEYS)
    retention = r.table(data.get("retention", {}), "retention", _POLICY_KEYS)
    limits = r.table(data.get("limits", {}), "limits", _LIMIT_KEYS)
    server.update(_security(r, data, path))
    try:
        default_policy = _policy(cfg.broker.default_policy, retention)
    except ValueError as exc:
        raise r.error("retention", "discard", str(exc).split(": ", 1)[1]) from None
    rules: list[PolicyRule] = []
    channels = data.get("channel", [])
    if not isinstance(channels, list):
        raise r.error(None, "channel", "[[channel]] tables, each with a pattern")
    for i, table in enumerate(channels):
        pattern = table.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise r.error("channel", "pattern", "a channel glob such as 'telemetry.*'", i)
        values = r.table({k: v for k, v in table.items() if k != "pattern"}, "channel", _POLICY_KEYS, i)
        try:
            rules.append(PolicyRule(pattern, _policy(default_policy, values)))
        except ValueError as exc:
            raise r.error("channel", "discard", str(exc).split(": ", 1)[1], i) from None
    renames = {"ack_deadline": "default_ack_deadline", "max_in_flight": "default_max_in_flight"}
    try:
        broker = replace(
            cfg.broker,
            limits=replace(cfg.broker.limits, **limits),
            default_policy=default_policy,
            policies=tuple(rules) + cfg.broker.policies,
            **{renames.get(k, k): v for k, v in delivery.items()},
        )
        if "store" in server:
            server["store_url"] = server.pop("store")
        return replace(cfg, broker=broker, **server)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
