"""Plain data the core and the stores exchange: no I/O, no gRPC."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

DEFAULT_GROUP = "default"
DEAD_LETTER_SUFFIX = ".dead-letter"

StartKind = Literal["default", "new", "earliest", "seq", "time"]


@dataclass(slots=True)
class NewMessage:
    """A message as a producer hands it in."""

    payload: bytes
    id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    ttl: float = 0.0  # seconds; 0: none


@dataclass(slots=True)
class Stored:
    """A message as the store keeps it, and as one delivery of it (attempt, reason)."""

    seq: int
    id: str
    payload: bytes
    attributes: Mapping[str, str]
    publish_time: float  # unix seconds
    expires_at: float = 0.0  # unix seconds; 0: never
    attempt: int = 1
    reason: str = ""  # why the previous attempt failed (claims only)

    def expired(self, now: float) -> bool:
        return 0.0 < self.expires_at <= now


class AppendResult(NamedTuple):
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StartSpec:
    """Where a new group (or a broadcast cursor) starts."""

    kind: StartKind = "default"
    value: float = 0  # a seq for "seq", unix seconds for "time"


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """Per-channel limits, resolved from the config by channel pattern."""

    max_age: float = 7 * 24 * 3600.0
    max_messages: int = 1_000_000
    max_bytes: int = 1 << 30
    discard: Literal["drop-oldest", "reject"] = "drop-oldest"
    dedupe_window: float = 120.0
    default_group: bool = True


@dataclass(frozen=True, slots=True)
class PolicyRule:
    pattern: str
    policy: ChannelPolicy

    def matches(self, channel: str) -> bool:
        return fnmatch.fnmatchcase(channel, self.pattern)


@dataclass(slots=True)
class TrimReport:
    acked: int = 0  # removed because every durable group had acked them
    aged: int = 0  # dropped by max_age
    dropped: int = 0  # dropped by max_messages / max_bytes
    expired: int = 0  # ttl passed before delivery
    oldest: float = 0.0  # publish time of the oldest message left (0: none, or not known)

    @property
    def total(self) -> int:
        return self.acked + self.aged + self.dropped + self.expired


@dataclass(slots=True)
class PendingEntry:
    seq: int
    consumer: str
    deadline: float  # unix seconds: redeliverable from then on
    attempt: int
    reason: str = ""


@dataclass(slots=True)
class GroupStats:
    name: str
    cursor: int
    lag: int
    pending: int


@dataclass(slots=True)
class ChannelStats:
    name: str
    depth: int
    bytes: int
    first_seq: int
    last_seq: int
    oldest_publish_time: float  # 0: empty
    groups: list[GroupStats]
    dropped: int = 0
    expired: int = 0
