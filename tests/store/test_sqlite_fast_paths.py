"""The SQLite store's fast paths against its slow ones and against the memory store: appends that
share one INSERT, messages handed out from the cache of recent appends, pending entries kept as
one range per read_new, and a file of schema version 1 (pending entries one row per seq).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pushchannel.core.model import DEFAULT_GROUP, ChannelPolicy, NewMessage, PendingEntry, Stored
from pushchannel.store import _sqlite_schema as schema
from pushchannel.store.base import Store
from pushchannel.store.memory import MemoryStore
from pushchannel.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(60)

CH = "hosts.berlin-1"
T0 = 1_700_000_000.123456
POLICY = ChannelPolicy()


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(f"sqlite:///{path}")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def fields(m: Stored) -> tuple[Any, ...]:
    return (m.seq, m.id, m.payload, dict(m.attributes), m.publish_time, m.expires_at, m.attempt, m.reason)


def batches() -> list[tuple[str, list[NewMessage], float]]:
    """Appends of every kind, to two channels, each at its own time."""
    out: list[tuple[str, list[NewMessage], float]] = []
    for i in range(20):
        t = T0 + i * 0.000_123_7
        kind = i % 6
        if kind == 0:
            messages = [NewMessage(bytes([i, j]) * (j + 1)) for j in range(7)]
        elif kind == 1:
            messages = [NewMessage(b"", id=f"id-{i}-{j}") for j in range(3)]  # empty payloads
        elif kind == 2:
            messages = [
                NewMessage(b"a\x00b", attributes={"k": "v\x00", "ü": "😀", "n": str(j)}) for j in range(2)
            ]
        elif kind == 3:
            messages = [NewMessage(b"ttl", ttl=1.5 + j) for j in range(2)]
        elif kind == 4:
            messages = [NewMessage(b"x" * 300, id="dup-a"), NewMessage(b"y", id="dup-a"), NewMessage(b"z")]
        else:
            messages = [NewMessage(b"nul id", id="id\x00with nul"), NewMessage(b"plain")]
        out.append((CH if i % 3 else "other", messages, t))
    return out


async def test_appends_sharing_a_transaction_keep_every_field(tmp_path: Path) -> None:
    """Appends queued together share one transaction (and, where they can, one INSERT): what
    read_new and read_range hand out from the cache, what the file holds after a restart and
    what the memory store stores are the same."""
    path = tmp_path / "pc.db"
    memory = MemoryStore()
    for channel, messages, t in batches():
        await memory.append(channel, messages, t, POLICY)
    async with opened(path) as store:
        before = store.commits
        await asyncio.gather(*(store.append(c, m, t, POLICY) for c, m, t in batches()))
        assert store.commits - before <= 3  # shared
        fresh = {
            c: [fields(m) for m in await store.read_new(c, DEFAULT_GROUP, "c1", 1000, T0 + 30)]
            for c in (CH, "other")
        }
        cached = {c: [fields(m) for m in await store.read_range(c, 0, 1000)] for c in (CH, "other")}
    async with opened(path) as store:
        stored = {c: [fields(m) for m in await store.read_range(c, 0, 1000)] for c in (CH, "other")}
        for c in (CH, "other"):
            expected = [fields(m) for m in await memory.read_range(c, 0, 1000)]
            assert expected, c
            assert fresh[c] == cached[c] == stored[c] == expected, c
            stats = await store.stats(c)
            mstats = await memory.stats(c)
            assert stats is not None and mstats is not None
            assert (stats.depth, stats.bytes, stats.last_seq) == (mstats.depth, mstats.bytes, mstats.last_seq)


async def test_a_failing_append_undoes_nothing_of_the_others_that_shared_its_insert(tmp_path: Path) -> None:
    """A lone surrogate cannot be stored: the shared INSERT fails, and the appends run again
    one by one, so only the bad one fails."""
    async with opened(tmp_path / "pc.db") as store:
        outcomes = await asyncio.gather(
            store.append(CH, [NewMessage(b"one")], T0, POLICY),
            store.append(CH, [NewMessage(b"bad", id="\ud800")], T0 + 1, POLICY),
            store.append(CH, [NewMessage(b"two")], T0 + 2, POLICY),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], Exception)
        assert [m.payload for m in await store.read_range(CH, 0, 10)] == [b"one", b"two"]
        assert [(m.seq, m.publish_time) for m in await store.read_range(CH, 0, 10)] == [(1, T0), (2, T0 + 2)]


async def _ranges_script(store: Store) -> list[Any]:
    """Reads, partial and whole acks, nacks, extensions and claims of what read_new handed out."""
    seen: list[Any] = []

    def pending(entries: list[PendingEntry]) -> list[tuple[Any, ...]]:
        return [(e.seq, e.consumer, e.deadline, e.attempt, e.reason) for e in entries]

    await store.append(CH, [NewMessage(f"m{i}".encode()) for i in range(40)], T0, POLICY)
    a = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 10)  # 1..10
    b = await store.read_new(CH, DEFAULT_GROUP, "c2", 10, T0 + 20)  # 11..20
    c = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)  # 21..30
    d = await store.read_new(CH, DEFAULT_GROUP, "c3", 5, T0 + 40)  # 31..35
    seen.append([len(x) for x in (a, b, c, d)])
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 1000)))
    seen.append(await store.ack(CH, DEFAULT_GROUP, [m.seq for m in b]))  # a whole range
    seen.append(await store.ack(CH, DEFAULT_GROUP, [3, 4, 5]))  # part of one
    seen.append(await store.ack(CH, DEFAULT_GROUP, [9, 10, 11, 12, 21]))  # across ranges and gaps
    seen.append(await store.ack(CH, DEFAULT_GROUP, [22, 22, 40, 39]))  # duplicates, unknown
    seen.append(await store.nack(CH, DEFAULT_GROUP, [24, 25], T0 + 5, "nope"))
    seen.append(await store.extend(CH, DEFAULT_GROUP, [31], T0 + 100))
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 1000)))
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 7)))
    seen.append(await store.next_deadline(CH, DEFAULT_GROUP))
    stats = await store.stats(CH)
    assert stats is not None
    seen.append([(g.name, g.cursor, g.lag, g.pending) for g in stats.groups])
    claimed = await store.claim_expired(CH, DEFAULT_GROUP, "c9", 4, T0 + 10, T0 + 50)
    seen.append([fields(m) for m in claimed])
    claimed = await store.claim_expired(CH, DEFAULT_GROUP, "c9", 100, T0 + 35, T0 + 60)
    seen.append([fields(m) for m in claimed])
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 1000)))
    seen.append(await store.ack(CH, DEFAULT_GROUP, list(range(1, 41))))
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 1000)))
    e = await store.read_new(CH, DEFAULT_GROUP, "c1", 100, T0 + 70)  # 36..40
    seen.append([m.seq for m in e])
    report = await store.trim(CH, POLICY, T0 + 1)
    seen.append(report.acked)
    seen.append(await store.purge(CH))
    seen.append(pending(await store.pending(CH, DEFAULT_GROUP, 1000)))
    return seen


async def test_pending_ranges_behave_as_single_entries(tmp_path: Path) -> None:
    expected = await _ranges_script(MemoryStore())
    async with opened(tmp_path / "pc.db") as store:
        assert await _ranges_script(store) == expected


async def test_pending_ranges_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path) as store:
        await store.append(CH, [NewMessage(f"m{i}".encode()) for i in range(10)], T0, POLICY)
        await store.read_new(CH, DEFAULT_GROUP, "c1", 6, T0 + 10)
        await store.read_new(CH, DEFAULT_GROUP, "c2", 6, T0 + 20)
        before = await store.pending(CH, DEFAULT_GROUP)
    async with opened(path) as store:
        assert await store.pending(CH, DEFAULT_GROUP) == before
        assert [m.seq for m in await store.read_new(CH, DEFAULT_GROUP, "c3", 10, T0 + 30)] == []
        got = await store.claim_expired(CH, DEFAULT_GROUP, "c3", 100, T0 + 15, T0 + 40)
        assert [(m.seq, m.attempt) for m in got] == [(s, 2) for s in range(1, 7)]
        assert await store.ack(CH, DEFAULT_GROUP, list(range(1, 11))) == 10


async def test_a_version_1_file_is_migrated_with_its_pending_entries(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    conn.execute(f"PRAGMA application_id={schema.APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO channels (id, name, last_seq, bytes) VALUES (1, ?, 3, 6)", (CH,))
    for seq in (1, 2, 3):
        conn.execute(
            "INSERT INTO messages VALUES (1, ?, '', ?, NULL, ?, 0.0, 2)", (seq, f"m{seq}".encode(), T0)
        )
    conn.execute("INSERT INTO groups (id, channel_id, name, cursor) VALUES (7, 1, ?, 2)", (DEFAULT_GROUP,))
    conn.execute(
        "INSERT INTO pending VALUES (7, 1, 'c1', ?, 1, ''), (7, 2, 'c1', ?, 2, 'x')", (T0 + 5, T0 + 9)
    )
    conn.execute("COMMIT")
    conn.close()
    async with opened(path) as store:
        assert await store.pragma("user_version") == schema.SCHEMA_VERSION
        assert [(e.seq, e.attempt, e.reason) for e in await store.pending(CH, DEFAULT_GROUP)] == [
            (1, 1, ""),
            (2, 2, "x"),
        ]
        assert [m.seq for m in await store.read_new(CH, DEFAULT_GROUP, "c2", 10, T0 + 20)] == [3]
        assert [e.seq for e in await store.pending(CH, DEFAULT_GROUP)] == [1, 2, 3]
        assert await store.ack(CH, DEFAULT_GROUP, [1, 2, 3]) == 3
        assert await store.pending(CH, DEFAULT_GROUP) == []
