"""How the SDK cuts publish_many into Publish requests (no broker needed)."""

from __future__ import annotations

import re

import pytest

from pushchannel.client import OutgoingMessage
from pushchannel.client._async import MAX_BATCH, _requests


def test_requests_hold_at_most_max_batch_messages_in_order() -> None:
    requests = list(_requests("c", [f"m{i}" for i in range(2 * MAX_BATCH + 500)]))
    assert [len(r.messages) for r in requests] == [MAX_BATCH, MAX_BATCH, 500]
    assert all(r.channel == "c" for r in requests)
    payloads = [m.payload.decode() for r in requests for m in r.messages]
    assert payloads == [f"m{i}" for i in range(2 * MAX_BATCH + 500)]
    ids = [m.id for r in requests for m in r.messages]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_requests_are_cut_by_size_and_keep_every_field() -> None:
    big = [
        OutgoingMessage(bytes([i]) * (900 * 1024), id=f"id-{i}", attributes={"i": str(i)}, ttl=2.5)
        for i in range(6)
    ]
    requests = list(_requests("c", big))
    assert [len(r.messages) for r in requests] == [3, 3]  # about 3 MiB each
    got = [m for r in requests for m in r.messages]
    assert [m.id for m in got] == [f"id-{i}" for i in range(6)]
    assert [dict(m.attributes) for m in got] == [{"i": str(i)} for i in range(6)]
    assert [m.ttl_ms for m in got] == [2500] * 6
    assert [m.payload for m in got] == [m.payload for m in big]


def test_a_bad_message_raises_when_reached_after_the_requests_before_it() -> None:
    messages: list[str | OutgoingMessage] = [f"m{i}" for i in range(MAX_BATCH)]
    messages += ["last good", OutgoingMessage(b"x", ttl=-1)]
    requests = _requests("c", messages)
    first = next(requests)
    assert len(first.messages) == MAX_BATCH
    with pytest.raises(ValueError, match="ttl must be positive"):
        next(requests)
