"""What only the SQLite store promises: durability, group commit, errors at its boundary, and a
file that does not grow forever. Real files under tmp_path; the conformance suite covers the rest.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
    DEFAULT_GROUP,
    AppendResult,
    ChannelPolicy,
    NewMessage,
    StartSpec,
)
from pushchannel.errors import InvalidArgument, ResourceExhausted, Unavailable
from pushchannel.store import _sqlite_schema as schema
from pushchannel.store._sqlite_schema import APPLICATION_ID, SCHEMA_VERSION
from pushchannel.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(60)

CH = "hosts.berlin-1"
T0 = 1_700_000_000.5
POLICY = ChannelPolicy()
ROOT = Path(__file__).resolve().parents[2]


def url(path: Path) -> str:
    return f"sqlite:///{path}"


@asynccontextmanager
async def opened(path: Path, **kwargs: Any) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(url(path), **kwargs)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def msgs(*payloads: bytes, ids: list[str] | None = None) -> list[NewMessage]:
    return [NewMessage(p, id=ids[i] if ids else "") for i, p in enumerate(payloads)]


async def expect_unavailable(path: Path, *fragments: str) -> str:
    store = SQLiteStore(url(path))
    with pytest.raises(Unavailable) as info:
        await store.start()
    await store.close()  # harmless after a failed start
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


# ---------------------------------------------------------------------------------------------
# URL, lifecycle
# ---------------------------------------------------------------------------------------------


def test_url_forms() -> None:
    assert SQLiteStore("sqlite:///data/pc.db").path == Path("data/pc.db")
    assert SQLiteStore("sqlite:////var/lib/pc.db").path == Path("/var/lib/pc.db")
    for bad in ("sqlite://", "sqlite:///", "sqlite:/x.db", "memory://"):
        with pytest.raises(InvalidArgument):
            SQLiteStore(bad)
    with pytest.raises(InvalidArgument):
        SQLiteStore("sqlite:///x.db", fsync="sometimes")  # type: ignore[arg-type]


async def test_start_creates_parent_directories_and_a_relative_path_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("sqlite:///deep/er/pc.db")
    await store.start()
    try:
        assert await store.append(CH, msgs(b"a"), T0, POLICY) == [AppendResult(1, False)]
    finally:
        await store.close()
    assert (tmp_path / "deep" / "er" / "pc.db").is_file()


async def test_a_closed_store_refuses_calls_and_closes_twice(tmp_path: Path) -> None:
    store = SQLiteStore(url(tmp_path / "pc.db"))
    with pytest.raises(Unavailable, match="not open"):
        await store.last_seq(CH)
    await store.start()
    await store.append(CH, msgs(b"a"), T0, POLICY)
    await store.close()
    await store.close()
    with pytest.raises(Unavailable, match="not open"):
        await store.append(CH, msgs(b"b"), T0, POLICY)
    # ...and it can be started again on the same file.
    await store.start()
    try:
        assert await store.last_seq(CH) == 1
    finally:
        await store.close()


async def test_pragmas(tmp_path: Path) -> None:
    async with opened(tmp_path / "normal.db") as store:
        assert str(await store.pragma("journal_mode")).lower() == "wal"
        assert await store.pragma("synchronous") == 1  # NORMAL
        assert await store.pragma("auto_vacuum") == 2  # INCREMENTAL
        assert await store.pragma("user_version") == SCHEMA_VERSION
        assert await store.pragma("application_id") == APPLICATION_ID
    async with opened(tmp_path / "full.db", fsync="full") as store:
        assert await store.pragma("synchronous") == 2  # FULL
    with pytest.raises(InvalidArgument):
        async with opened(tmp_path / "x.db") as store:
            await store.pragma("synchronous; DROP TABLE messages")


async def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    path.write_bytes(b"")  # what `touch` leaves: SQLite's empty database, schema version 0
    async with opened(path) as store:
        assert await store.pragma("user_version") == SCHEMA_VERSION
        assert await store.append(CH, msgs(b"a"), T0, POLICY) == [AppendResult(1, False)]


async def test_start_runs_the_missing_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of version 1 meets a pushchannel that knows version 2: migrated at start, data kept."""
    path = tmp_path / "pc.db"
    async with opened(path) as store:
        await store.append(CH, msgs(b"kept"), T0, POLICY)

    def v2(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE channels ADD COLUMN note TEXT NOT NULL DEFAULT ''")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, v2])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    async with opened(path) as store:
        assert await store.pragma("user_version") == SCHEMA_VERSION + 1
        assert [m.payload for m in await store.read_range(CH, 0, 10)] == [b"kept"]
        assert await store.append(CH, msgs(b"more"), T0, POLICY) == [AppendResult(2, False)]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT name, note FROM channels").fetchall() == [(CH, "")]
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# durability
# ---------------------------------------------------------------------------------------------


async def test_restart_keeps_the_log_groups_pending_and_dedupe(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    limited = ChannelPolicy(max_messages=4)
    async with opened(path) as store:
        await store.ensure_channel(CH, limited, T0)
        await store.ensure_group(CH, "audit", StartSpec("earliest"), T0)
        batch = [
            NewMessage(f"m{i}".encode(), id=f"id-{i}", attributes={"i": str(i), "ü": "ß"}) for i in range(6)
        ]
        assert [r.seq for r in await store.append(CH, batch, T0, limited)] == [1, 2, 3, 4, 5, 6]
        await store.read_new(CH, DEFAULT_GROUP, "c1", 3, T0 + 10)
        await store.read_new(CH, "audit", "c9", 1, T0 + 20)
        (claimed,) = await store.claim_expired(CH, "audit", "c8", 1, T0 + 20, T0 + 50)
        await store.nack(CH, DEFAULT_GROUP, [4], T0 + 15, "handler crashed")
        await store.ack(CH, DEFAULT_GROUP, [5])
        before = (
            [
                (m.seq, m.id, m.payload, dict(m.attributes), m.publish_time)
                for m in await store.read_range(CH, 0, 99)
            ],
            await store.stats(CH),
            await store.pending(CH, DEFAULT_GROUP),
            await store.pending(CH, "audit"),
        )
        assert before[1] is not None and before[1].dropped == 2
        assert claimed.seq == 3 and claimed.attempt == 2

    for _ in range(2):  # twice: reopening does not disturb anything either
        async with opened(path) as store:
            after = (
                [
                    (m.seq, m.id, m.payload, dict(m.attributes), m.publish_time)
                    for m in await store.read_range(CH, 0, 99)
                ],
                await store.stats(CH),
                await store.pending(CH, DEFAULT_GROUP),
                await store.pending(CH, "audit"),
            )
            assert after == before

    async with opened(path) as store:
        assert [(e.seq, e.attempt, e.reason) for e in await store.pending(CH, DEFAULT_GROUP)] == [
            (3, 1, ""),
            (4, 1, "handler crashed"),
        ]
        assert await store.next_deadline(CH, DEFAULT_GROUP) == T0 + 10
        got = await store.claim_expired(CH, DEFAULT_GROUP, "c2", 10, T0 + 15, T0 + 60)
        assert [(m.seq, m.attempt, m.reason) for m in got] == [
            (3, 2, "ack deadline exceeded"),
            (4, 2, "handler crashed"),
        ]
        # Dedupe survives (also for ids whose message was dropped), and seqs go on.
        retry = [
            NewMessage(b"again", id="id-0"),
            NewMessage(b"again", id="id-5"),
            NewMessage(b"new", id="id-9"),
        ]
        assert await store.append(CH, retry, T0 + 30, limited) == [
            AppendResult(1, True),
            AppendResult(6, True),
            AppendResult(7, False),
        ]


KILL_SCRIPT = """
import asyncio, sys, time
from pushchannel.core.model import ChannelPolicy, NewMessage
from pushchannel.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.start()
    policy = ChannelPolicy()

    async def producer(k):
        for i in range(100_000):
            results = await store.append(
                "ch", [NewMessage(b"p", id=f"{k}-{i}-{j}") for j in range(5)], time.time(), policy
            )
            print(" ".join(str(r.seq) for r in results), flush=True)

    await asyncio.gather(*(producer(k) for k in range(4)))

asyncio.run(main())
"""


async def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Every append answered before a SIGKILL is in the file afterwards."""
    path = tmp_path / "pc.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILL_SCRIPT, url(path), env=env, stdout=subprocess.PIPE
    )
    acknowledged: set[int] = set()
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while len(acknowledged) < 2000:
                line = await proc.stdout.readline()
                assert line, "the publisher died"
                acknowledged.update(int(s) for s in line.split())
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with opened(path) as store:
        stored = {m.seq for m in await store.read_range("ch", 0, 10**9)}
        assert acknowledged <= stored
        last = await store.last_seq("ch")
        assert stored == set(range(1, last + 1))


# ---------------------------------------------------------------------------------------------
# group commit
# ---------------------------------------------------------------------------------------------


async def test_concurrent_calls_share_commits(tmp_path: Path) -> None:
    async with opened(tmp_path / "pc.db") as store:
        await store.ensure_channel(CH, POLICY, T0)
        before = store.commits
        results = await asyncio.gather(
            *(store.append(CH, msgs(f"m{i}".encode()), T0, POLICY) for i in range(200))
        )
        assert sorted(r[0].seq for r in results) == list(range(1, 201))
        publishes = store.commits - before
        assert 1 <= publishes <= 20, publishes

        got = await store.read_new(CH, DEFAULT_GROUP, "c1", 200, T0 + 30)
        before = store.commits
        acks = await asyncio.gather(
            *(store.ack(CH, DEFAULT_GROUP, [m.seq]) for m in got),
            *(store.append("other", msgs(b"x"), T0, POLICY) for _ in range(50)),
        )
        assert acks[:200] == [1] * 200
        assert store.commits - before <= 25
        assert await store.pending(CH, DEFAULT_GROUP) == []


async def test_a_failing_operation_rolls_back_alone(tmp_path: Path) -> None:
    """A dead-letter move that cannot be stored (its channel is full, policy reject) undoes its
    ack too, while the calls that shared its transaction commit."""
    reject = ChannelPolicy(max_messages=1, discard="reject")
    dead = CH + DEAD_LETTER_SUFFIX
    async with opened(tmp_path / "pc.db") as store:
        await store.append(dead, msgs(b"already dead"), T0, reject)  # the dead-letter channel is full
        await store.append(CH, msgs(b"poison"), T0, POLICY)
        (m,) = await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 30)
        before = store.commits
        outcomes = await asyncio.gather(
            store.append("left", msgs(b"l"), T0, POLICY),
            store.dead_letter(CH, DEFAULT_GROUP, [m], T0, reject),
            store.append("right", msgs(b"r"), T0, POLICY),
            return_exceptions=True,
        )
        assert store.commits - before == 1  # one transaction for all three
        assert outcomes[0] == [AppendResult(1, False)]
        assert isinstance(outcomes[1], ResourceExhausted)
        assert outcomes[2] == [AppendResult(1, False)]
        # Nothing of the failed move stayed: still pending at the origin, nothing appended.
        assert [e.seq for e in await store.pending(CH, DEFAULT_GROUP)] == [1]
        assert [x.payload for x in await store.read_range(dead, 0, 10)] == [b"already dead"]
        assert await store.channels() == sorted([CH, dead, "left", "right"])


async def test_dead_letter_is_one_transaction(tmp_path: Path) -> None:
    async with opened(tmp_path / "pc.db") as store:
        await store.append(CH, msgs(b"poison"), T0, POLICY)
        (m,) = await store.read_new(CH, DEFAULT_GROUP, "c1", 1, T0 + 30)
        before = store.commits
        waiter = asyncio.create_task(store.wait(CH + DEAD_LETTER_SUFFIX, 0, 5.0))
        await store.dead_letter(CH, DEFAULT_GROUP, [m], T0 + 1, POLICY)
        assert store.commits - before == 1
        async with asyncio.timeout(5):
            assert await waiter == 1  # woken after the commit
        assert await store.pending(CH, DEFAULT_GROUP) == []


# ---------------------------------------------------------------------------------------------
# disk full
# ---------------------------------------------------------------------------------------------


async def _fill(store: SQLiteStore, start: int) -> tuple[int, ResourceExhausted]:
    """Append 1 KiB messages until the store is full; the number of messages stored."""
    rng = random.Random(start)
    stored = 0
    for i in range(2000):
        batch = [NewMessage(rng.randbytes(1024), id=f"fill-{start}-{i}-{j}") for j in range(4)]
        try:
            await store.append(CH, batch, T0, POLICY)
        except ResourceExhausted as exc:
            return stored, exc
        stored += len(batch)
    raise AssertionError("the store never filled up")


async def test_disk_full_is_resource_exhausted_and_writes_nothing_half(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path, max_page_count=200) as store:
        stored, exc = await _fill(store, 0)
        assert stored > 0
        assert "store is full" in str(exc)
        stats = await store.stats(CH)
        assert stats is not None
        assert (stats.depth, stats.first_seq, stats.last_seq) == (stored, 1, stored)
        got = await store.read_range(CH, 0, 10**6)
        assert [m.seq for m in got] == list(range(1, stored + 1))
        assert all(len(m.payload) == 1024 for m in got)
        assert stats.bytes == 1024 * stored
        # Still full: the same again, and nothing changes.
        with pytest.raises(ResourceExhausted):
            await store.append(CH, msgs(b"x" * 65536), T0, POLICY)
        assert await store.last_seq(CH) == stored

        # Consuming and trimming makes room again.
        handed = await store.read_new(CH, DEFAULT_GROUP, "c1", 10**6, T0 + 30)
        assert await store.ack(CH, DEFAULT_GROUP, [m.seq for m in handed]) == stored
        assert (await store.trim(CH, POLICY, T0 + 1)).acked == stored
        assert await store.append(CH, msgs(b"after"), T0 + 2, POLICY) == [AppendResult(stored + 1, False)]

    # Without the cap the same file takes more.
    async with opened(path) as store:
        assert await store.append(CH, msgs(b"y" * 1_000_000), T0 + 3, POLICY) == [
            AppendResult(stored + 2, False)
        ]


async def test_disk_full_in_a_shared_transaction_fails_only_its_caller(tmp_path: Path) -> None:
    async with opened(tmp_path / "pc.db", max_page_count=200) as store:
        await store.append("small", msgs(b"s1"), T0, POLICY)
        _, exc = await _fill(store, 2)
        assert "size cap" in str(exc)  # appends stop short of the cap...
        before = store.commits
        outcomes = await asyncio.gather(
            store.append("small", msgs(b"s2"), T0, POLICY),
            # ...and one too big for the rest hits the cap itself, inside the shared transaction.
            store.append(CH, msgs(os.urandom(300_000)), T0, POLICY),
            store.last_seq("small"),
            return_exceptions=True,
        )
        assert store.commits - before == 1
        assert outcomes[0] == [AppendResult(2, False)]
        assert isinstance(outcomes[1], ResourceExhausted)
        assert "database or disk is full" in str(outcomes[1])
        assert outcomes[2] == 2
        assert [m.payload for m in await store.read_range("small", 0, 10)] == [b"s1", b"s2"]


# ---------------------------------------------------------------------------------------------
# files that cannot be used
# ---------------------------------------------------------------------------------------------


async def test_a_file_of_random_bytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    data = random.Random(7).randbytes(64 * 1024)
    path.write_bytes(data)
    await expect_unavailable(path, "not a valid pushchannel database", "move it away or restore a backup")
    assert path.read_bytes() == data  # untouched


async def test_a_damaged_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path) as store:
        for i in range(50):
            await store.append(CH, [NewMessage(os.urandom(2000), attributes={"n": str(i)})], T0, POLICY)
    size = path.stat().st_size
    assert size > 20 * 4096
    with path.open("r+b") as f:  # scribble over b-tree pages, header left intact
        f.seek(4096 * 3)
        f.write(random.Random(3).randbytes(4096 * 4))
    await expect_unavailable(path, "not a valid pushchannel database (corrupt?)", "restore a backup")


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    await expect_unavailable(path, "another application")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path) as store:
        await store.append(CH, msgs(b"a"), T0, POLICY)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    await expect_unavailable(path, f"schema version {SCHEMA_VERSION + 1}", "newer")


async def test_a_file_in_use_by_another_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path):
        await expect_unavailable(path, "in use by another pushchannel broker", f"pid {os.getpid()}")
    async with opened(path):  # released on close
        pass


async def test_the_file_can_be_read_and_backed_up_while_the_store_runs(tmp_path: Path) -> None:
    path = tmp_path / "pc.db"
    async with opened(path) as store:
        await store.append(CH, msgs(b"a", b"b"), T0, POLICY)
        reader = sqlite3.connect(path)
        backup = sqlite3.connect(tmp_path / "backup.db")
        try:
            assert reader.execute("SELECT count(*) FROM messages").fetchone() == (2,)
            reader.backup(backup)
        finally:
            reader.close()
            backup.close()
        await store.append(CH, msgs(b"c"), T0, POLICY)  # the writer goes on meanwhile
    async with opened(tmp_path / "backup.db") as restored:
        assert [m.payload for m in await restored.read_range(CH, 0, 10)] == [b"a", b"b"]


async def test_a_path_that_cannot_be_a_database(tmp_path: Path) -> None:
    (tmp_path / "a-dir.db").mkdir()
    await expect_unavailable(tmp_path / "a-dir.db", "not a file")
    (tmp_path / "a-file").write_text("x")
    await expect_unavailable(tmp_path / "a-file" / "pc.db", "cannot use the store")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
async def test_a_read_only_file_or_directory_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ro" / "pc.db"
    async with opened(path) as store:
        await store.append(CH, msgs(b"a"), T0, POLICY)
    path.chmod(0o444)
    try:
        await expect_unavailable(path, "read-only")
    finally:
        path.chmod(0o644)
    path.parent.chmod(0o555)
    try:
        await expect_unavailable(path.parent / "new.db")
    finally:
        path.parent.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# the file's size
# ---------------------------------------------------------------------------------------------


def _disk_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def test_the_file_does_not_grow_without_bound(tmp_path: Path) -> None:
    """Rounds of append, consume, trim: freed pages are reused and given back to the disk."""
    path = tmp_path / "pc.db"
    payload = os.urandom(2048)
    peaks, after_trim = [], []
    async with opened(path) as store:
        for round_ in range(6):
            for _ in range(25):
                await store.append(CH, [NewMessage(payload) for _ in range(200)], T0 + round_, POLICY)
            peaks.append(_disk_size(path))
            while got := await store.read_new(CH, DEFAULT_GROUP, "c1", 1000, T0 + 100):
                await store.ack(CH, DEFAULT_GROUP, [m.seq for m in got])
            assert (await store.trim(CH, POLICY, T0 + round_)).acked == 5000
            after_trim.append(_disk_size(path))
    assert max(peaks[1:]) <= peaks[0] * 1.5, peaks
    assert max(after_trim) <= peaks[0] / 2, (peaks, after_trim)
    assert path.stat().st_size <= peaks[0] / 2
