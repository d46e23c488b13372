"""Input rules (SPEC §8), as plain functions shared by every service. Each failure raises
InvalidArgument with a message that names the rule and the limit."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pushchannel.config import Limits
from pushchannel.core.model import DEAD_LETTER_SUFFIX, NewMessage, StartSpec
from pushchannel.errors import InvalidArgument

_CHANNEL_RE = re.compile(r"[A-Za-z0-9._\-:/]+")
CHANNEL_RULE = "1-255 bytes of A-Z a-z 0-9 . _ - : /, not starting with '.'"


def check_channel(channel: str, limits: Limits) -> str:
    if not channel:
        raise InvalidArgument(f"channel name is empty: a channel name is {CHANNEL_RULE}")
    limit = limits.max_channel_bytes
    if channel.endswith(DEAD_LETTER_SUFFIX):  # the dead-letter channel of any valid channel is valid
        limit += len(DEAD_LETTER_SUFFIX)
    if len(channel) > limit:
        raise InvalidArgument(
            f"channel name is {len(channel)} bytes, over the limit of {limits.max_channel_bytes}: "
            f"a channel name is {CHANNEL_RULE}"
        )
    if not _CHANNEL_RE.fullmatch(channel):
        bad = next(c for c in channel if not _CHANNEL_RE.fullmatch(c))
        raise InvalidArgument(
            f"channel name {channel[:64]!r} has the character {bad!r}: a channel name is {CHANNEL_RULE}"
        )
    if channel[0] == ".":
        raise InvalidArgument(
            f"channel name {channel[:64]!r} starts with '.': a channel name is {CHANNEL_RULE}"
        )
    return channel


def check_group(group: str, limits: Limits) -> str:
    if not group:
        return group
    if len(group) > limits.max_channel_bytes or not _CHANNEL_RE.fullmatch(group) or group[0] == ".":
        raise InvalidArgument(f"group name {group[:64]!r} is not valid: a group name is {CHANNEL_RULE}")
    return group


def check_attributes(attributes: Mapping[str, str], limits: Limits) -> None:
    if len(attributes) > limits.max_attributes:
        raise InvalidArgument(
            f"a message has {len(attributes)} attributes, over the limit of {limits.max_attributes}"
        )
    for key, value in attributes.items():
        if not key:
            raise InvalidArgument("an attribute key is empty")
        if len(key.encode()) > limits.max_attribute_key:
            raise InvalidArgument(
                f"attribute key {key[:32]!r}... is {len(key.encode())} bytes, "
                f"over the limit of {limits.max_attribute_key}"
            )
        if len(value.encode()) > limits.max_attribute_value:
            raise InvalidArgument(
                f"attribute {key[:32]!r} has a value of {len(value.encode())} bytes, "
                f"over the limit of {limits.max_attribute_value}"
            )


def check_messages(messages: Sequence[NewMessage], limits: Limits) -> None:
    if not messages:
        raise InvalidArgument("a publish carries no message: send 1 to 1000 messages")
    if len(messages) > limits.max_batch:
        raise InvalidArgument(
            f"a publish carries {len(messages)} messages, over the limit of {limits.max_batch} per publish"
        )
    max_payload = limits.max_payload
    for i, m in enumerate(messages):
        size = len(m.payload)
        if size > max_payload:
            raise InvalidArgument(
                f"message {i} has a payload of {size} bytes, over the limit of {max_payload} bytes"
            )
        if m.attributes:
            check_attributes(m.attributes, limits)
        if m.id and len(m.id.encode()) > limits.max_id_bytes:
            raise InvalidArgument(f"message {i} has an id over the limit of {limits.max_id_bytes} bytes")
        if m.ttl < 0 or m.ttl > limits.max_ttl:
            raise InvalidArgument(f"message {i} has a ttl out of range (0 to {limits.max_ttl:g} s)")


def check_in_flight(max_in_flight: int, limits: Limits) -> None:
    if not 1 <= max_in_flight <= limits.max_in_flight:
        raise InvalidArgument(f"max_in_flight is {max_in_flight}: it must be 1 to {limits.max_in_flight}")


def check_ack_deadline(seconds: float, limits: Limits) -> None:
    if not 0 < seconds <= limits.max_ack_deadline:
        raise InvalidArgument(
            f"ack deadline of {seconds:g} s is out of range: 0 to {limits.max_ack_deadline:g} s"
        )


MAX_SEQ = (1 << 63) - 1  # what every store can hold (SQLite INTEGER, Redis stream ids)


def check_start(start: StartSpec) -> None:
    if start.kind == "seq" and not 0 <= start.value <= MAX_SEQ:
        raise InvalidArgument(f"start seq {int(start.value)} is out of range: 1 to {MAX_SEQ}")
