"""The definition of a store: every implementation of ``pushchannel.store.base.Store`` passes this.

Written against the interface only. Times are handed in, so the tests drive time with plain
floats (T0 onwards) and never sleep; only ``wait`` uses the event loop's clock, with short bounds.

Conventions fixed here (every store must agree, so limits mean the same everywhere):

- a message's size, for ``max_bytes`` and ``stats.bytes``, is its payload plus the UTF-8 bytes
  of its attribute keys and values (the id is not counted);
- a duplicate is a message whose id was stored less than ``dedupe_window`` seconds earlier;
- a message is aged out once it is more than ``max_age`` seconds old.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
    DEFAULT_GROUP,
    AppendResult,
    ChannelPolicy,
    NewMessage,
    StartSpec,
    Stored,
)
from pushchannel.errors import ResourceExhausted
from pushchannel.store.base import Store

from .conftest import StoreOpener, require_durable

CH = "hosts.berlin-1"
T0 = 1_700_000_000.25
POLICY = ChannelPolicy()
NO_GROUP = ChannelPolicy(default_group=False)
EXPIRED_REASON = "ack deadline exceeded"
BIG = 1000


def size_of(payload: bytes, attributes: Mapping[str, str] | None = None) -> int:
    return len(payload) + sum(len(k.encode()) + len(v.encode()) for k, v in (attributes or {}).items())


async def put(
    store: Store,
    *payloads: bytes | str,
    now: float = T0,
    policy: ChannelPolicy = POLICY,
    channel: str = CH,
    ids: Sequence[str] | None = None,
) -> list[AppendResult]:
    """Append one batch of plain messages (payloads as str for brevity)."""
    msgs = [
        NewMessage(payload=p.encode() if isinstance(p, str) else p, id=ids[i] if ids else "")
        for i, p in enumerate(payloads)
    ]
    return await store.append(channel, msgs, now, policy)


async def seqs_in(store: Store, channel: str = CH) -> list[int]:
    return [m.seq for m in await store.read_range(channel, 0, BIG)]


async def payloads_in(store: Store, channel: str = CH) -> list[bytes]:
    return [m.payload for m in await store.read_range(channel, 0, BIG)]


def seqs(messages: Sequence[Stored]) -> list[int]:
    return [m.seq for m in messages]


def view(m: Stored) -> tuple[object, ...]:
    """Everything a delivery carries, with attributes as a plain dict."""
    return (m.seq, m.id, m.payload, dict(m.attributes), m.publish_time, m.expires_at, m.attempt, m.reason)


async def pending_view(store: Store, group: str = DEFAULT_GROUP) -> list[tuple[int, str, float, int]]:
    return [(e.seq, e.consumer, e.deadline, e.attempt) for e in await store.pending(CH, group)]


async def group_stats(store: Store, group: str = DEFAULT_GROUP) -> tuple[int, int, int]:
    stats = await store.stats(CH)
    assert stats is not None
    (g,) = [g for g in stats.groups if g.name == group]
    return g.cursor, g.lag, g.pending


# ---------------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------------


async def test_append_assigns_contiguous_seqs_from_one(store: Store) -> None:
    assert await store.last_seq(CH) == 0
    assert await put(store, "a") == [AppendResult(1, False)]
    assert await put(store, "b") == [AppendResult(2, False)]
    assert await put(store, "c") == [AppendResult(3, False)]
    assert await store.last_seq(CH) == 3
    assert await seqs_in(store) == [1, 2, 3]


async def test_append_batch_results_in_order(store: Store) -> None:
    await put(store, "a")
    results = await put(store, "b", "c", "d", "e")
    assert results == [AppendResult(s, False) for s in (2, 3, 4, 5)]
    assert await payloads_in(store) == [b"a", b"b", b"c", b"d", b"e"]
    assert await store.last_seq(CH) == 5


async def test_append_empty_batch(store: Store) -> None:
    assert await store.append(CH, [], T0, POLICY) == []
    assert await store.last_seq(CH) == 0


async def test_append_keeps_every_field(store: Store) -> None:
    attrs = {"k": "v", "ünï": "cödé"}
    results = await store.append(
        CH,
        [
            NewMessage(payload=b"\x00\xffbin", id="cmd-42", attributes=attrs, ttl=30.0),
            NewMessage(payload=b"plain"),
        ],
        T0,
        POLICY,
    )
    assert results == [AppendResult(1, False), AppendResult(2, False)]
    got = await store.read_range(CH, 0, 10)
    assert [view(m) for m in got] == [
        (1, "cmd-42", b"\x00\xffbin", attrs, T0, T0 + 30.0, 1, ""),
        (2, "", b"plain", {}, T0, 0.0, 1, ""),
    ]


async def test_append_creates_the_channel_with_its_default_group(store: Store) -> None:
    assert await store.channels() == []
    assert await store.stats(CH) is None
    await put(store, "a")
    assert await store.channels() == [CH]
    assert await store.groups(CH) == [DEFAULT_GROUP]
    # The default group starts at the beginning: it gets what was published before anyone came.
    got = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    assert seqs(got) == [1]


async def test_append_creates_the_channel_without_a_group_when_the_policy_says_so(store: Store) -> None:
    await put(store, "a", policy=NO_GROUP)
    assert await store.channels() == [CH]
    assert await store.groups(CH) == []


async def test_ensure_channel(store: Store) -> None:
    assert await store.ensure_channel(CH, POLICY, T0) is True
    assert await store.ensure_channel(CH, POLICY, T0) is False
    assert await store.groups(CH) == [DEFAULT_GROUP]
    assert await store.last_seq(CH) == 0
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.name, stats.depth, stats.last_seq) == (CH, 0, 0)

    assert await store.ensure_channel("other", NO_GROUP, T0) is True
    assert await store.groups("other") == []
    assert await store.channels() == [CH, "other"]


async def test_ensure_channel_does_not_touch_an_existing_channel(store: Store) -> None:
    await put(store, "a", "b")
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 30)
    assert await store.ensure_channel(CH, POLICY, T0 + 1) is False
    assert await seqs_in(store) == [1, 2]
    assert await group_stats(store) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# dedupe
# ---------------------------------------------------------------------------------------------


async def test_dedupe_within_the_window(store: Store) -> None:
    assert await put(store, "first", ids=["x"]) == [AppendResult(1, False)]
    assert await put(store, "other", ids=["y"]) == [AppendResult(2, False)]
    # A retry a little later: not stored again, the first seq comes back.
    assert await put(store, "retry", ids=["x"], now=T0 + POLICY.dedupe_window - 1) == [AppendResult(1, True)]
    assert await store.last_seq(CH) == 2
    assert await payloads_in(store) == [b"first", b"other"]
    stats = await store.stats(CH)
    assert stats is not None and stats.depth == 2


async def test_dedupe_within_one_batch(store: Store) -> None:
    results = await put(store, "a", "b", "c", "d", ids=["x", "x", "y", "x"])
    assert results == [
        AppendResult(1, False),
        AppendResult(1, True),
        AppendResult(2, False),
        AppendResult(1, True),
    ]
    assert await payloads_in(store) == [b"a", b"c"]
    assert await store.last_seq(CH) == 2


async def test_dedupe_mixed_batch_with_earlier_ids(store: Store) -> None:
    await put(store, "a", ids=["x"])
    results = await put(store, "b", "c", "d", ids=["y", "x", "z"], now=T0 + 1)
    assert results == [AppendResult(2, False), AppendResult(1, True), AppendResult(3, False)]
    assert await payloads_in(store) == [b"a", b"b", b"d"]


async def test_dedupe_window_passes(store: Store) -> None:
    window = 10.0
    policy = ChannelPolicy(dedupe_window=window)
    assert await put(store, "a", ids=["x"], policy=policy) == [AppendResult(1, False)]
    assert await put(store, "b", ids=["x"], policy=policy, now=T0 + window - 0.5) == [AppendResult(1, True)]
    later = T0 + window + 1
    assert await put(store, "c", ids=["x"], policy=policy, now=later) == [AppendResult(2, False)]
    # ...and the window now counts from the second store.
    assert await put(store, "d", ids=["x"], policy=policy, now=later + 1) == [AppendResult(2, True)]
    assert await payloads_in(store) == [b"a", b"c"]


async def test_empty_id_never_dedupes(store: Store) -> None:
    assert await put(store, "a", "b", ids=["", ""]) == [AppendResult(1, False), AppendResult(2, False)]
    assert await put(store, "c", ids=[""]) == [AppendResult(3, False)]
    assert await payloads_in(store) == [b"a", b"b", b"c"]


async def test_dedupe_is_per_channel(store: Store) -> None:
    assert await put(store, "a", ids=["x"]) == [AppendResult(1, False)]
    assert await put(store, "b", ids=["x"], channel="other") == [AppendResult(1, False)]
    assert await put(store, "c", ids=["x"], channel="other") == [AppendResult(1, True)]
    assert await payloads_in(store, "other") == [b"b"]


async def test_dedupe_outlives_the_message(store: Store) -> None:
    """A producer's retry must not store a message again just because it was consumed already."""
    await put(store, "a", ids=["x"])
    got = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    assert await store.ack(CH, DEFAULT_GROUP, seqs(got)) == 1
    report = await store.trim(CH, POLICY, T0 + 1)
    assert report.acked == 1
    assert await seqs_in(store) == []
    assert await put(store, "a", ids=["x"], now=T0 + 2) == [AppendResult(1, True)]
    assert await store.last_seq(CH) == 1


# ---------------------------------------------------------------------------------------------
# read_range
# ---------------------------------------------------------------------------------------------


async def test_read_range(store: Store) -> None:
    await put(store, *(f"m{i}" for i in range(1, 11)))
    assert seqs(await store.read_range(CH, 0, 100)) == list(range(1, 11))
    assert seqs(await store.read_range(CH, 0, 3)) == [1, 2, 3]
    assert seqs(await store.read_range(CH, 4, 3)) == [5, 6, 7]
    assert seqs(await store.read_range(CH, 8, 100)) == [9, 10]
    assert await store.read_range(CH, 10, 100) == []
    assert await store.read_range(CH, 50, 100) == []
    assert [m.payload for m in await store.read_range(CH, 2, 2)] == [b"m3", b"m4"]


async def test_read_range_empty_and_missing_channels(store: Store) -> None:
    assert await store.read_range("missing", 0, 10) == []
    await store.ensure_channel(CH, POLICY, T0)
    assert await store.read_range(CH, 0, 10) == []


async def test_read_range_does_not_touch_groups(store: Store) -> None:
    await put(store, "a", "b")
    await store.read_range(CH, 0, 10)
    assert await group_stats(store) == (0, 2, 0)
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)) == [1, 2]


# ---------------------------------------------------------------------------------------------
# groups: ensure_group, read_new, pending
# ---------------------------------------------------------------------------------------------


async def _three_at_times(store: Store) -> None:
    """seq 1 at T0, seq 2 at T0+10, seq 3 at T0+20, on a channel without groups."""
    for i in range(3):
        await put(store, f"m{i + 1}", now=T0 + 10 * i, policy=NO_GROUP)


async def _first_read(store: Store, group: str) -> list[int]:
    return seqs(await store.read_new(CH, group, "c1", 100, T0 + 100))


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (StartSpec("new"), []),
        (StartSpec("earliest"), [1, 2, 3]),
        (StartSpec("default"), []),  # a named group starts at new by default
        (StartSpec("seq", 2), [2, 3]),
        (StartSpec("seq", 1), [1, 2, 3]),
        (StartSpec("seq", 3), [3]),
        (StartSpec("seq", 4), []),
        (StartSpec("time", T0 + 10), [2, 3]),
        (StartSpec("time", T0 + 15), [3]),
        (StartSpec("time", T0 - 100), [1, 2, 3]),
        (StartSpec("time", T0 + 100), []),
    ],
    ids=lambda v: f"{v.kind}-{v.value}" if isinstance(v, StartSpec) else None,
)
async def test_ensure_group_start(store: Store, start: StartSpec, expected: list[int]) -> None:
    await _three_at_times(store)
    assert await store.ensure_group(CH, "g", start, T0 + 30) is True
    assert await _first_read(store, "g") == expected
    # Whatever the start, what comes next is delivered.
    await put(store, "m4", now=T0 + 40, policy=NO_GROUP)
    assert await _first_read(store, "g") == [4]


async def test_ensure_group_default_start_of_the_default_group_is_earliest(store: Store) -> None:
    await _three_at_times(store)
    assert await store.ensure_group(CH, DEFAULT_GROUP, StartSpec(), T0 + 30) is True
    assert await _first_read(store, DEFAULT_GROUP) == [1, 2, 3]


async def test_ensure_group_earliest_after_trim_starts_at_the_first_live_message(store: Store) -> None:
    await _three_at_times(store)
    await store.trim(CH, NO_GROUP, T0 + 30, keep_from=3)
    assert await seqs_in(store) == [3]
    await store.ensure_group(CH, "g", StartSpec("earliest"), T0 + 30)
    assert await _first_read(store, "g") == [3]


async def test_ensure_group_new_on_a_fully_trimmed_channel(store: Store) -> None:
    await _three_at_times(store)
    await store.trim(CH, NO_GROUP, T0 + 30)
    assert await seqs_in(store) == []
    await store.ensure_group(CH, "g", StartSpec("earliest"), T0 + 30)
    await store.ensure_group(CH, "h", StartSpec("new"), T0 + 30)
    await put(store, "m4", now=T0 + 40, policy=NO_GROUP)
    assert await _first_read(store, "g") == [4]
    assert await _first_read(store, "h") == [4]


async def test_existing_group_keeps_its_place(store: Store) -> None:
    await _three_at_times(store)
    assert await store.ensure_group(CH, "g", StartSpec("earliest"), T0) is True
    assert seqs(await store.read_new(CH, "g", "c1", 2, T0 + 100)) == [1, 2]
    assert await store.ensure_group(CH, "g", StartSpec("earliest"), T0) is False
    assert await store.ensure_group(CH, "g", StartSpec("new"), T0) is False
    assert await _first_read(store, "g") == [3]
    assert [e.seq for e in await store.pending(CH, "g")] == [1, 2, 3]


async def test_groups_are_listed_sorted(store: Store) -> None:
    await put(store, "a")
    for name in ("zeta", "alpha", "mid"):
        await store.ensure_group(CH, name, StartSpec("new"), T0)
    assert await store.groups(CH) == ["alpha", DEFAULT_GROUP, "mid", "zeta"]
    assert await store.groups("missing") == []


async def test_read_new_advances_and_marks_pending(store: Store) -> None:
    await put(store, "a", "b", "c")
    got = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    assert [view(m) for m in got] == [
        (1, "", b"a", {}, T0, 0.0, 1, ""),
        (2, "", b"b", {}, T0, 0.0, 1, ""),
        (3, "", b"c", {}, T0, 0.0, 1, ""),
    ]
    assert await pending_view(store) == [(s, "c1", T0 + 30, 1) for s in (1, 2, 3)]
    assert all(e.reason == "" for e in await store.pending(CH, DEFAULT_GROUP))
    assert await group_stats(store) == (3, 0, 3)
    # Nothing new: nothing handed out, nothing changes.
    assert await store.read_new(CH, DEFAULT_GROUP, "c2", 10, T0 + 60) == []
    assert await pending_view(store) == [(s, "c1", T0 + 30, 1) for s in (1, 2, 3)]


async def test_read_new_with_limit(store: Store) -> None:
    await put(store, *(f"m{i}" for i in range(1, 8)))
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 3, T0 + 30)) == [1, 2, 3]
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c2", 3, T0 + 40)) == [4, 5, 6]
    assert await group_stats(store) == (6, 1, 6)
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 3, T0 + 50)) == [7]
    assert await pending_view(store) == [
        (1, "c1", T0 + 30, 1),
        (2, "c1", T0 + 30, 1),
        (3, "c1", T0 + 30, 1),
        (4, "c2", T0 + 40, 1),
        (5, "c2", T0 + 40, 1),
        (6, "c2", T0 + 40, 1),
        (7, "c1", T0 + 50, 1),
    ]
    assert await store.pending(CH, DEFAULT_GROUP, limit=2) == (await store.pending(CH, DEFAULT_GROUP))[:2]


async def test_two_groups_each_get_everything(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await put(store, "a", "b", "c")
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)) == [1, 2, 3]
    assert seqs(await store.read_new(CH, "audit", "c9", 2, T0 + 30)) == [1, 2]
    assert await store.ack(CH, DEFAULT_GROUP, [1, 2, 3]) == 3
    assert seqs(await store.read_new(CH, "audit", "c9", 10, T0 + 30)) == [3]
    assert [e.seq for e in await store.pending(CH, "audit")] == [1, 2, 3]
    assert await store.pending(CH, DEFAULT_GROUP) == []


# ---------------------------------------------------------------------------------------------
# claim_expired, ack, nack, extend, next_deadline
# ---------------------------------------------------------------------------------------------


async def _handed_out(store: Store, n: int = 3, deadline: float = T0 + 30) -> list[Stored]:
    await put(store, *(f"m{i}" for i in range(1, n + 1)))
    return await store.read_new(CH, DEFAULT_GROUP, "c1", n, deadline)


async def test_claim_nothing_before_the_deadline(store: Store) -> None:
    await _handed_out(store)
    assert await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 29.5, T0 + 60) == []
    assert await pending_view(store) == [(s, "c1", T0 + 30, 1) for s in (1, 2, 3)]


async def test_claim_after_the_deadline(store: Store) -> None:
    first = await _handed_out(store)
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 31, T0 + 61)
    assert sorted(view(m) for m in got) == [view(replace(m, attempt=2, reason=EXPIRED_REASON)) for m in first]
    # They are now c2's, until the new deadline, on their second attempt.
    assert await pending_view(store) == [(s, "c2", T0 + 61, 2) for s in (1, 2, 3)]
    assert await store.claim_expired(CH, DEFAULT_GROUP, "c3", 10, T0 + 60, T0 + 90) == []
    again = await store.claim_expired(CH, DEFAULT_GROUP, "c3", 10, T0 + 61, T0 + 91)
    assert sorted((m.seq, m.attempt, m.reason) for m in again) == [(s, 3, EXPIRED_REASON) for s in (1, 2, 3)]
    assert await pending_view(store) == [(s, "c3", T0 + 91, 3) for s in (1, 2, 3)]


async def test_claim_at_exactly_the_deadline(store: Store) -> None:
    await _handed_out(store, 1)
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 30, T0 + 60)
    assert [(m.seq, m.attempt) for m in got] == [(1, 2)]


async def test_claim_limit_leaves_the_rest_claimable(store: Store) -> None:
    await _handed_out(store, 5)
    a = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 2, T0 + 31, T0 + 61)
    assert len(a) == 2
    b = await store.claim_expired(CH, DEFAULT_GROUP, "c3", 2, T0 + 31, T0 + 62)
    assert len(b) == 2
    c = await store.claim_expired(CH, DEFAULT_GROUP, "c4", 2, T0 + 31, T0 + 63)
    assert len(c) == 1
    assert await store.claim_expired(CH, DEFAULT_GROUP, "c5", 2, T0 + 31, T0 + 64) == []
    assert sorted(seqs(a + b + c)) == [1, 2, 3, 4, 5]
    assert all(m.attempt == 2 for m in a + b + c)
    owner = {e.seq: (e.consumer, e.deadline) for e in await store.pending(CH, DEFAULT_GROUP)}
    for batch, consumer, deadline in ((a, "c2", T0 + 61), (b, "c3", T0 + 62), (c, "c4", T0 + 63)):
        for m in batch:
            assert owner[m.seq] == (consumer, deadline)


async def test_claim_only_takes_due_entries(store: Store) -> None:
    await put(store, "a", "b", "c")
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 10)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 50)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 20)
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 25, T0 + 100)
    assert sorted(seqs(got)) == [1, 3]
    assert await pending_view(store) == [
        (1, "c2", T0 + 100, 2),
        (2, "c1", T0 + 50, 1),
        (3, "c2", T0 + 100, 2),
    ]


async def test_claim_is_per_group(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await _handed_out(store)
    assert await store.claim_expired(CH, "audit", "c2", 10, T0 + 100, T0 + 200) == []
    assert await store.read_new(CH, "audit", "c2", 10, T0 + 200) != []


async def test_ack(store: Store) -> None:
    await _handed_out(store, 4)
    assert await store.ack(CH, DEFAULT_GROUP, [1, 3]) == 2
    assert [e.seq for e in await store.pending(CH, DEFAULT_GROUP)] == [2, 4]
    assert await store.ack(CH, DEFAULT_GROUP, [1, 3]) == 0  # already acked
    assert await store.ack(CH, DEFAULT_GROUP, [99, 0]) == 0  # never handed out
    assert await store.ack(CH, DEFAULT_GROUP, [2, 2, 99]) == 1
    assert await store.ack(CH, DEFAULT_GROUP, []) == 0
    assert await store.ack(CH, "missing-group", [4]) == 0
    assert await store.ack("missing-channel", DEFAULT_GROUP, [4]) == 0
    assert await group_stats(store) == (4, 0, 1)
    # Acked deliveries are never redelivered.
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 100, T0 + 200)
    assert seqs(got) == [4]


async def test_ack_nack_extend_count_distinct_pending_seqs(store: Store) -> None:
    """A seq listed twice counts once (as an SQL ``UPDATE ... IN`` or Redis ``XACK`` would)."""
    await _handed_out(store, 3)
    assert await store.extend(CH, DEFAULT_GROUP, [1, 1, 2, 99], T0 + 40) == 2
    assert await store.nack(CH, DEFAULT_GROUP, [2, 2, 3, 3, 99], T0 + 5, "r") == 2
    assert await store.ack(CH, DEFAULT_GROUP, [3, 3, 1, 1, 99]) == 2
    assert await pending_view(store) == [(2, "c1", T0 + 5, 1)]


async def test_ack_of_a_seq_not_yet_handed_out(store: Store) -> None:
    await put(store, "a", "b")
    assert await store.ack(CH, DEFAULT_GROUP, [1, 2]) == 0
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)) == [1, 2]


async def test_nack_makes_claimable_at_visible_at_with_its_reason(store: Store) -> None:
    await _handed_out(store, 2)
    assert await store.nack(CH, DEFAULT_GROUP, [1], T0 + 45, "handler crashed") == 1
    assert await store.nack(CH, DEFAULT_GROUP, [99], T0 + 45, "x") == 0
    # Seq 2's deadline (T0+30) passes first; seq 1 waits for visible_at although its lease ended.
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 44, T0 + 100)
    assert [(m.seq, m.attempt, m.reason) for m in got] == [(2, 2, EXPIRED_REASON)]
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 45, T0 + 100)
    assert [(m.seq, m.attempt, m.reason) for m in got] == [(1, 2, "handler crashed")]
    # The reason belongs to the nacked attempt: the next expiry is a plain deadline again.
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c3", 10, T0 + 100, T0 + 200)
    assert sorted((m.seq, m.attempt, m.reason) for m in got) == [
        (1, 3, EXPIRED_REASON),
        (2, 3, EXPIRED_REASON),
    ]


async def test_nack_now_is_claimable_at_once(store: Store) -> None:
    await _handed_out(store, 3)
    assert await store.nack(CH, DEFAULT_GROUP, [2, 3], T0 + 1, "consumer disconnected") == 2
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 1, T0 + 31)
    assert sorted((m.seq, m.attempt, m.reason) for m in got) == [
        (2, 2, "consumer disconnected"),
        (3, 2, "consumer disconnected"),
    ]
    assert await pending_view(store) == [(1, "c1", T0 + 30, 1), (2, "c2", T0 + 31, 2), (3, "c2", T0 + 31, 2)]


async def test_extend_moves_the_deadline(store: Store) -> None:
    await _handed_out(store, 2)
    assert await store.extend(CH, DEFAULT_GROUP, [1, 99], T0 + 90) == 1
    assert await pending_view(store) == [(1, "c1", T0 + 90, 1), (2, "c1", T0 + 30, 1)]
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 89, T0 + 200)
    assert seqs(got) == [2]
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 90, T0 + 200)
    assert [(m.seq, m.attempt) for m in got] == [(1, 2)]


async def test_extend_can_shorten_the_deadline(store: Store) -> None:
    await _handed_out(store, 1, deadline=T0 + 60)
    assert await store.extend(CH, DEFAULT_GROUP, [1], T0 + 10) == 1
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 10, T0 + 200)
    assert seqs(got) == [1]


async def test_next_deadline(store: Store) -> None:
    assert await store.next_deadline(CH, DEFAULT_GROUP) is None
    await put(store, "a", "b", "c")
    assert await store.next_deadline(CH, DEFAULT_GROUP) is None
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 100)
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 100
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 50)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 70)
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 50
    await store.ack(CH, DEFAULT_GROUP, [2])
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 70
    await store.extend(CH, DEFAULT_GROUP, [3], T0 + 200)
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 100
    await store.nack(CH, DEFAULT_GROUP, [3], T0 + 5, "nope")
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 5
    await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 5, T0 + 300)
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 100
    await store.ack(CH, DEFAULT_GROUP, [1])
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 300
    await store.ack(CH, DEFAULT_GROUP, [3])
    assert await store.next_deadline(CH, DEFAULT_GROUP) is None
    assert await store.next_deadline(CH, "missing") is None
    assert await store.next_deadline("missing", DEFAULT_GROUP) is None


async def test_next_deadline_after_a_partial_claim(store: Store) -> None:
    await _handed_out(store, 3, deadline=T0 + 10)
    await store.claim_expired(CH, DEFAULT_GROUP, "c2", 1, T0 + 20, T0 + 50)
    # Two are still due (T0+10) and not taken yet.
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 10


# ---------------------------------------------------------------------------------------------
# dead letter
# ---------------------------------------------------------------------------------------------


async def test_dead_letter_moves_with_origin_attributes(store: Store) -> None:
    await store.append(CH, [NewMessage(b"poison", id="p-1", attributes={"k": "v"})], T0, POLICY)
    await put(store, "fine")
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    await store.ack(CH, DEFAULT_GROUP, [2])
    await store.nack(CH, DEFAULT_GROUP, [1], T0 + 1, "bad input")
    (m,) = await store.claim_expired(CH, DEFAULT_GROUP, "c1", 10, T0 + 1, T0 + 31)
    await store.nack(CH, DEFAULT_GROUP, [1], T0 + 2, "bad input again")
    (m,) = await store.claim_expired(CH, DEFAULT_GROUP, "c1", 10, T0 + 2, T0 + 32)
    assert (m.attempt, m.reason) == (3, "bad input again")

    dl = CH + DEAD_LETTER_SUFFIX
    await store.dead_letter(CH, DEFAULT_GROUP, [m], T0 + 3, POLICY)

    assert await store.pending(CH, DEFAULT_GROUP) == []
    (moved,) = await store.read_range(dl, 0, 10)
    assert moved.payload == b"poison"
    assert dict(moved.attributes) == {
        "k": "v",
        "pushchannel.origin_channel": CH,
        "pushchannel.origin_group": DEFAULT_GROUP,
        "pushchannel.origin_seq": "1",
        "pushchannel.attempts": "2",
        "pushchannel.reason": "bad input again",
    }
    assert moved.publish_time == T0 + 3
    assert await store.groups(dl) == [DEFAULT_GROUP]
    assert CH + DEAD_LETTER_SUFFIX in await store.channels()
    # Acked on the origin: interest trimming frees it there.
    await store.trim(CH, POLICY, T0 + 4)
    assert await seqs_in(store) == []


async def test_dead_letter_nothing(store: Store) -> None:
    await put(store, "a")
    await store.dead_letter(CH, DEFAULT_GROUP, [], T0, POLICY)
    assert await store.channels() == [CH]


# ---------------------------------------------------------------------------------------------
# trim and limits
# ---------------------------------------------------------------------------------------------


async def test_trim_removes_what_every_group_acked(store: Store) -> None:
    await _handed_out(store, 3)
    assert (await store.trim(CH, POLICY, T0 + 1)).total == 0
    await store.ack(CH, DEFAULT_GROUP, [1, 2])
    report = await store.trim(CH, POLICY, T0 + 1)
    assert (report.acked, report.total) == (2, 2)
    assert await seqs_in(store) == [3]
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.first_seq, stats.last_seq) == (1, 3, 3)
    await store.ack(CH, DEFAULT_GROUP, [3])
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 1
    assert await seqs_in(store) == []
    assert await store.last_seq(CH) == 3
    # Seqs never restart.
    assert await put(store, "d", now=T0 + 2) == [AppendResult(4, False)]


async def test_trim_keeps_what_a_group_has_not_read(store: Store) -> None:
    await put(store, "a", "b", "c")
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 30)
    await store.ack(CH, DEFAULT_GROUP, [1])
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 1
    assert await seqs_in(store) == [2, 3]


async def test_trim_keeps_a_pending_message_and_what_follows(store: Store) -> None:
    await _handed_out(store, 3)
    await store.ack(CH, DEFAULT_GROUP, [2, 3])
    assert (await store.trim(CH, POLICY, T0 + 1)).total == 0
    assert await seqs_in(store) == [1, 2, 3]
    await store.ack(CH, DEFAULT_GROUP, [1])
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 3
    assert await seqs_in(store) == []


async def test_trim_waits_for_every_group(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await _handed_out(store, 2)
    await store.ack(CH, DEFAULT_GROUP, [1, 2])
    assert (await store.trim(CH, POLICY, T0 + 1)).total == 0
    assert await seqs_in(store) == [1, 2]
    await store.read_new(CH, "audit", "c9", 10, T0 + 30)
    await store.ack(CH, "audit", [1])
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 1
    assert await seqs_in(store) == [2]
    await store.ack(CH, "audit", [2])
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 1
    assert await seqs_in(store) == []


async def test_trim_after_delete_group(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await _handed_out(store, 2)
    await store.ack(CH, DEFAULT_GROUP, [1, 2])
    assert await store.delete_group(CH, "audit") is True
    assert (await store.trim(CH, POLICY, T0 + 1)).acked == 2
    assert await seqs_in(store) == []


async def test_trim_without_groups_keeps_nothing(store: Store) -> None:
    await put(store, "a", "b", "c", policy=NO_GROUP)
    assert await seqs_in(store) == [1, 2, 3]  # kept until trimmed
    report = await store.trim(CH, NO_GROUP, T0 + 1)
    assert report.acked == 3
    assert await seqs_in(store) == []


async def test_trim_keep_from_protects(store: Store) -> None:
    await put(store, "a", "b", "c", "d", "e", policy=NO_GROUP)
    assert (await store.trim(CH, NO_GROUP, T0 + 1, keep_from=3)).acked == 2
    assert await seqs_in(store) == [3, 4, 5]
    assert (await store.trim(CH, NO_GROUP, T0 + 1, keep_from=1)).total == 0
    assert await seqs_in(store) == [3, 4, 5]
    assert (await store.trim(CH, NO_GROUP, T0 + 1, keep_from=6)).acked == 3
    assert await seqs_in(store) == []


async def test_trim_keep_from_below_the_groups(store: Store) -> None:
    await _handed_out(store, 4)
    await store.ack(CH, DEFAULT_GROUP, [1, 2, 3, 4])
    assert (await store.trim(CH, POLICY, T0 + 1, keep_from=2)).acked == 1
    assert await seqs_in(store) == [2, 3, 4]


async def test_trim_max_age(store: Store) -> None:
    policy = ChannelPolicy(max_age=100.0)
    await put(store, "old1", "old2", now=T0, policy=policy)
    await put(store, "new", now=T0 + 50, policy=policy)
    assert (await store.trim(CH, policy, T0 + 99)).total == 0
    report = await store.trim(CH, policy, T0 + 101)
    assert (report.aged, report.acked, report.total) == (2, 0, 2)
    assert await payloads_in(store) == [b"new"]
    # The default group never saw them: it goes on with what is left.
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 200)) == [3]
    report = await store.trim(CH, policy, T0 + 151)
    assert report.aged == 1
    assert await seqs_in(store) == []


async def test_trim_max_age_drops_pending_messages_and_claim_forgets_them(store: Store) -> None:
    policy = ChannelPolicy(max_age=100.0)
    await put(store, "a", "b", now=T0, policy=policy)
    await put(store, "c", now=T0 + 50, policy=policy)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 120)
    assert (await store.trim(CH, policy, T0 + 110)).aged == 2
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 130, T0 + 200)
    assert [(m.seq, m.attempt) for m in got] == [(3, 2)]
    assert await pending_view(store) == [(3, "c2", T0 + 200, 2)]


async def test_drop_oldest_by_count_at_append(store: Store) -> None:
    policy = ChannelPolicy(max_messages=3)
    for i in range(1, 6):
        assert await put(store, f"m{i}", now=T0 + i, policy=policy) == [AppendResult(i, False)]
    assert await seqs_in(store) == [3, 4, 5]
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.first_seq, stats.last_seq, stats.dropped) == (3, 3, 5, 2)
    assert stats.oldest_publish_time == T0 + 3
    # The default group's cursor skips what was dropped.
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)) == [3, 4, 5]


async def test_drop_oldest_with_one_big_batch(store: Store) -> None:
    policy = ChannelPolicy(max_messages=2)
    results = await put(store, "a", "b", "c", "d", policy=policy)
    assert [r.seq for r in results] == [1, 2, 3, 4]
    assert await payloads_in(store) == [b"c", b"d"]
    stats = await store.stats(CH)
    assert stats is not None and stats.dropped == 2


async def test_drop_oldest_by_bytes_at_append(store: Store) -> None:
    policy = ChannelPolicy(max_bytes=250)
    for i in range(1, 5):
        await put(store, bytes([i]) * 100, now=T0 + i, policy=policy)
    assert await seqs_in(store) == [3, 4]
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.bytes, stats.dropped) == (2, 200, 2)


async def test_drop_oldest_of_pending_messages_then_claim_forgets_them(store: Store) -> None:
    policy = ChannelPolicy(max_messages=2)
    await put(store, "a", "b", policy=policy)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    await put(store, "c", "d", policy=policy, now=T0 + 1)
    assert await seqs_in(store) == [3, 4]
    # 1 and 2 are gone: their expired deliveries are dropped, not handed out again.
    assert await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 31, T0 + 61) == []
    assert await store.pending(CH, DEFAULT_GROUP) == []
    assert await store.next_deadline(CH, DEFAULT_GROUP) is None
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c2", 10, T0 + 61)) == [3, 4]


async def test_claim_returns_the_live_among_gone_messages(store: Store) -> None:
    policy = ChannelPolicy(max_messages=3)
    await put(store, "a", "b", "c", policy=policy)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    await put(store, "d", "e", policy=policy, now=T0 + 1)  # drops 1, 2 (pending)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 31, T0 + 61)
    assert sorted(seqs(got)) == [3, 4, 5]


@pytest.mark.parametrize(
    "policy",
    [ChannelPolicy(max_messages=3, discard="reject"), ChannelPolicy(max_bytes=3 * 10, discard="reject")],
    ids=["max_messages", "max_bytes"],
)
async def test_reject_stores_nothing_of_the_batch(store: Store, policy: ChannelPolicy) -> None:
    ten = [f"{i:010d}" for i in range(1, 6)]
    assert await put(store, ten[0], ten[1], policy=policy, ids=["a", "b"]) == [
        AppendResult(1, False),
        AppendResult(2, False),
    ]
    with pytest.raises(ResourceExhausted):
        await put(store, ten[2], ten[3], policy=policy, ids=["c", "d"], now=T0 + 1)
    assert await store.last_seq(CH) == 2
    assert await seqs_in(store) == [1, 2]
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.bytes, stats.dropped) == (2, 20, 0)
    # A batch of duplicates only stores nothing, so it is fine on a full channel.
    assert await put(store, ten[0], policy=policy, ids=["a"], now=T0 + 1) == [AppendResult(1, True)]
    # One that fits goes in.
    assert await put(store, ten[2], policy=policy, ids=["c"], now=T0 + 1) == [AppendResult(3, False)]
    with pytest.raises(ResourceExhausted):
        await put(store, ten[3], policy=policy, ids=["d"], now=T0 + 1)
    # Once consumed and trimmed there is room, and the rejected ids were never recorded.
    got = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    await store.ack(CH, DEFAULT_GROUP, seqs(got))
    await store.trim(CH, policy, T0 + 2)
    results = await put(store, ten[3], ten[4], policy=policy, ids=["d", "e"], now=T0 + 2)
    assert results == [AppendResult(4, False), AppendResult(5, False)]


@pytest.mark.parametrize("discard", ["drop-oldest", "reject"])
async def test_append_under_the_limits_removes_nothing(store: Store, discard: str) -> None:
    """Only trim (with its ``keep_from``, protecting broadcast cursors) removes what nobody needs:
    an append that fits must leave every stored message readable with read_range."""
    policy = ChannelPolicy(max_messages=100, discard=discard, default_group=False)  # type: ignore[arg-type]
    await put(store, "a", "b", "c", policy=policy)
    await put(store, "d", policy=policy, now=T0 + 1)
    assert await payloads_in(store) == [b"a", b"b", b"c", b"d"]
    # Same with a group that has acked everything.
    other = ChannelPolicy(max_messages=100, discard=discard)  # type: ignore[arg-type]
    await put(store, "a", "b", policy=other, channel="other")
    got = await store.read_new("other", DEFAULT_GROUP, "c1", 10, T0 + 30)
    await store.ack("other", DEFAULT_GROUP, seqs(got))
    await put(store, "c", policy=other, channel="other", now=T0 + 1)
    assert await payloads_in(store, "other") == [b"a", b"b", b"c"]


# ---------------------------------------------------------------------------------------------
# stats, channels, purge, delete
# ---------------------------------------------------------------------------------------------


async def test_stats(store: Store) -> None:
    assert await store.stats(CH) is None
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await store.append(CH, [NewMessage(b"hello", attributes={"ab": "cde"})], T0 + 1, POLICY)
    await put(store, "x" * 10, "y" * 20, now=T0 + 2)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 2, T0 + 30)
    await store.ack(CH, DEFAULT_GROUP, [1])
    await store.read_new(CH, "audit", "c1", 1, T0 + 30)

    stats = await store.stats(CH)
    assert stats is not None
    assert stats.name == CH
    assert stats.depth == 3
    assert stats.bytes == size_of(b"hello", {"ab": "cde"}) + 10 + 20
    assert (stats.first_seq, stats.last_seq) == (1, 3)
    assert stats.oldest_publish_time == T0 + 1
    assert stats.dropped == 0
    assert [(g.name, g.cursor, g.lag, g.pending) for g in stats.groups] == [
        ("audit", 1, 2, 1),
        (DEFAULT_GROUP, 2, 1, 1),
    ]


async def test_stats_of_an_empty_channel(store: Store) -> None:
    await store.ensure_channel(CH, NO_GROUP, T0)
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.bytes, stats.last_seq, stats.oldest_publish_time, stats.groups) == (
        0,
        0,
        0,
        0.0,
        [],
    )


async def test_stats_after_trim(store: Store) -> None:
    await put(store, "aa", now=T0, policy=NO_GROUP)
    await put(store, "bbb", now=T0 + 5, policy=NO_GROUP)
    await store.trim(CH, NO_GROUP, T0 + 6, keep_from=2)
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.bytes, stats.first_seq, stats.last_seq) == (1, 3, 2, 2)
    assert stats.oldest_publish_time == T0 + 5


async def test_channels_sorted(store: Store) -> None:
    for name in ("b", "a.2", "a.10", "A", "c/d"):
        await put(store, "x", channel=name)
    await store.ensure_channel("0", POLICY, T0)
    assert await store.channels() == sorted(["b", "a.2", "a.10", "A", "c/d", "0"])


async def test_purge(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("earliest"), T0)
    await _handed_out(store, 4)
    await store.ack(CH, DEFAULT_GROUP, [1])
    cursor_before, _, _ = await group_stats(store)
    assert await store.purge(CH) == 4
    assert await store.read_range(CH, 0, 10) == []
    assert await store.groups(CH) == ["audit", DEFAULT_GROUP]
    assert await store.pending(CH, DEFAULT_GROUP) == []
    assert await store.next_deadline(CH, DEFAULT_GROUP) is None
    stats = await store.stats(CH)
    assert stats is not None
    assert (stats.depth, stats.bytes, stats.last_seq) == (0, 0, 4)
    cursor, _, pending = await group_stats(store)
    assert cursor >= cursor_before and pending == 0
    # Nothing of the purged messages comes back, and the log goes on.
    assert await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 100, T0 + 200) == []
    assert await store.read_new(CH, "audit", "c2", 10, T0 + 100) == []
    assert await put(store, "e", now=T0 + 1) == [AppendResult(5, False)]
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 100)) == [5]
    assert seqs(await store.read_new(CH, "audit", "c1", 10, T0 + 100)) == [5]
    assert await store.purge("missing") == 0


async def test_delete(store: Store) -> None:
    await put(store, "a", "b")
    await put(store, "a", channel="keep")
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    assert await store.delete(CH) is True
    assert await store.delete(CH) is False
    assert await store.stats(CH) is None
    assert await store.channels() == ["keep"]
    assert await store.groups(CH) == []
    assert await store.pending(CH, DEFAULT_GROUP) == []
    assert await store.last_seq(CH) == 0
    assert await store.read_range(CH, 0, 10) == []
    assert await seqs_in(store, "keep") == [1]


async def test_delete_group(store: Store) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("earliest"), T0)
    await put(store, "a", "b")
    await store.read_new(CH, "audit", "c1", 10, T0 + 30)
    assert await store.delete_group(CH, "audit") is True
    assert await store.delete_group(CH, "audit") is False
    assert await store.delete_group("missing", "audit") is False
    assert await store.groups(CH) == [DEFAULT_GROUP]
    assert await store.pending(CH, "audit") == []
    stats = await store.stats(CH)
    assert stats is not None and [g.name for g in stats.groups] == [DEFAULT_GROUP]
    # A group of the same name made later starts afresh.
    assert await store.ensure_group(CH, "audit", StartSpec("earliest"), T0) is True
    assert await store.pending(CH, "audit") == []
    assert seqs(await store.read_new(CH, "audit", "c1", 10, T0 + 30)) == [1, 2]


async def test_delete_the_default_group(store: Store) -> None:
    await put(store, "a")
    assert await store.delete_group(CH, DEFAULT_GROUP) is True
    assert await store.groups(CH) == []
    # Later appends do not bring it back: the channel exists already.
    await put(store, "b")
    assert await store.groups(CH) == []


# ---------------------------------------------------------------------------------------------
# wait
# ---------------------------------------------------------------------------------------------


async def test_wait_returns_at_once_when_there_is_news(store: Store) -> None:
    await put(store, "a", "b")
    async with asyncio.timeout(2):
        assert await store.wait(CH, 1, 30.0) == 2
        assert await store.wait(CH, 0, 30.0) == 2


async def test_wait_wakes_on_append(store: Store) -> None:
    await put(store, "a")
    task = asyncio.create_task(store.wait(CH, 1, 30.0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    await put(store, "b", "c")
    async with asyncio.timeout(2):
        assert await task == 3


async def test_wait_wakes_on_the_first_append_to_a_new_channel(store: Store) -> None:
    tasks = [asyncio.create_task(store.wait(CH, 0, 30.0)) for _ in range(3)]
    other = asyncio.create_task(store.wait("other", 0, 0.3))
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    await put(store, "a")
    async with asyncio.timeout(2):
        assert await asyncio.gather(*tasks) == [1, 1, 1]
        assert await other == 0  # another channel's append does not wake it


async def test_wait_times_out(store: Store) -> None:
    await put(store, "a")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(2):
        assert await store.wait(CH, 1, 0.05) == 1
        assert await store.wait("missing", 0, 0.05) == 0
    assert loop.time() - started >= 0.09


# ---------------------------------------------------------------------------------------------
# durability
# ---------------------------------------------------------------------------------------------


async def test_everything_survives_a_restart(
    store: Store, store_factory: StoreOpener, store_name: str
) -> None:
    require_durable(store_name)
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("new"), T0)
    await store.append(
        CH,
        [
            NewMessage(b"one", id="id-1", attributes={"k": "v"}, ttl=60.0),
            NewMessage(b"two", id="id-2"),
            NewMessage(b"three"),
            NewMessage(b"four"),
        ],
        T0,
        POLICY,
    )
    await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 20)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 2, T0 + 30)
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 25, T0 + 61)
    assert [(m.seq, m.attempt) for m in got] == [(1, 2)]
    await store.nack(CH, DEFAULT_GROUP, [2], T0 + 40, "boom")
    await store.ack(CH, DEFAULT_GROUP, [3])
    await store.read_new(CH, "audit", "c9", 1, T0 + 50)
    await put(store, "five", channel="other", policy=NO_GROUP)

    messages = [view(m) for m in await store.read_range(CH, 0, 100)]
    stats = await store.stats(CH)
    pending = {g: await store.pending(CH, g) for g in (DEFAULT_GROUP, "audit")}
    channels = await store.channels()

    await store_factory.close(store)
    store = await store_factory()

    assert [view(m) for m in await store.read_range(CH, 0, 100)] == messages
    assert await store.stats(CH) == stats
    assert {g: await store.pending(CH, g) for g in (DEFAULT_GROUP, "audit")} == pending
    assert await store.channels() == channels
    assert await store.groups(CH) == ["audit", DEFAULT_GROUP]
    assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 40
    # Dedupe ids survive: a producer retrying across a restart does not duplicate.
    assert await put(store, "one", ids=["id-1"], now=T0 + 60) == [AppendResult(1, True)]
    # The log goes on where it was, and so do the groups.
    assert await put(store, "six", now=T0 + 60) == [AppendResult(5, False)]
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c3", 10, T0 + 90)) == [4, 5]
    assert seqs(await store.read_new(CH, "audit", "c3", 10, T0 + 90)) == [2, 3, 4, 5]
    got = await store.claim_expired(CH, DEFAULT_GROUP, "c3", 10, T0 + 61, T0 + 120)
    assert sorted((m.seq, m.attempt, m.reason) for m in got) == [
        (1, 3, EXPIRED_REASON),
        (2, 2, "boom"),
    ]


async def test_an_acked_and_trimmed_log_survives_a_restart(
    store: Store, store_factory: StoreOpener, store_name: str
) -> None:
    require_durable(store_name)
    await _handed_out(store, 3)
    await store.ack(CH, DEFAULT_GROUP, [1, 2, 3])
    await store.trim(CH, POLICY, T0 + 1)
    await store_factory.close(store)
    store = await store_factory()
    assert await store.last_seq(CH) == 3
    assert await put(store, "d", now=T0 + 2) == [AppendResult(4, False)]
    assert seqs(await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)) == [4]
