"""``sqlite:///PATH``: the durable embedded store (stdlib ``sqlite3``, WAL, group commit).

One writer thread owns the only connection. Every store call becomes an operation on a queue;
the thread takes everything queued, runs it in ONE transaction, commits once, then answers every
caller on the event loop. Concurrent publishes and acks therefore share commits, and a publish
is answered only after its transaction committed. docs/stores.md says what survives what.

A failing operation fails only its caller: when one fails, the whole transaction is rolled back
and the others run again, each in its own savepoint (so the usual transaction, where nothing
fails, pays for no savepoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
    AppendResult,
    ChannelPolicy,
    ChannelStats,
    NewMessage,
    PendingEntry,
    StartSpec,
    Stored,
    TrimReport,
)
from pushchannel.errors import InvalidArgument, Unavailable
from pushchannel.store._sqlite_schema import Fsync, open_database, parse_url, translate
from pushchannel.store._sqlite_tables import Refused, Tables
from pushchannel.store.base import Store

T = TypeVar("T")

#: At most this many operations share one transaction, so one commit never waits for a flood.
_MAX_BATCH = 2000

# (operation, the caller's future, whether it writes, whether it may run while appended messages
# wait to be written: see Tables.flush_rows)
_Job = tuple[Callable[[Tables], Any], "asyncio.Future[Any]", bool, bool]
_Outcome = tuple["asyncio.Future[Any]", bool, Any]


def _settle(items: list[_Outcome]) -> None:
    for fut, ok, value in items:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class SQLiteStore(Store):
    """A store in one SQLite file, written by one thread with group commit.

    ``url`` is ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.
    ``fsync="normal"`` (``PRAGMA synchronous=NORMAL``) survives a crash of the process (kill -9);
    ``"full"`` also survives power loss, at the cost of an fsync per commit (shared by everything
    in it). ``max_page_count`` caps the file (in 4 KiB pages): appends fail with
    ResourceExhausted an eighth short of it (at most 4 MiB), which leaves consumers the room to
    take, ack and trim; other writes fail at the cap itself, as on a full disk.
    """

    def __init__(self, url: str, *, fsync: Fsync = "normal", max_page_count: int | None = None) -> None:
        super().__init__()
        if fsync not in ("normal", "full"):
            raise InvalidArgument(f"fsync must be 'normal' or 'full', not {fsync!r}")
        if max_page_count is not None and max_page_count < 1:
            raise InvalidArgument(f"max_page_count must be positive, not {max_page_count}")
        self.path = parse_url(url)
        self.fsync: Fsync = fsync
        self.max_page_count = max_page_count
        #: Transactions committed so far (group commit: usually far fewer than write calls).
        self.commits = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._open = False

    def __repr__(self) -> str:
        return f"SQLiteStore('sqlite:///{self.path}', fsync={self.fsync!r})"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open (creating it if needed), check and migrate the file; Unavailable if it cannot
        be used (unwritable, corrupt, another application's, or from a newer pushchannel)."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._queue = queue.SimpleQueue()
        self._loop = loop
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._run,
            args=(loop, ready, self._stopped),
            name=f"pushchannel-sqlite:{self.path}",
            daemon=True,
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            await self._join()
            raise
        self._open = True

    async def close(self) -> None:
        """Answer everything queued, commit, stop the thread and close the file."""
        self._open = False
        await self._join()

    async def _join(self) -> None:
        thread, stopped = self._thread, self._stopped
        if thread is None or stopped is None:
            return
        self._queue.put(None)
        await asyncio.shield(stopped)
        thread.join()
        self._thread = None

    # -- the writer thread -------------------------------------------------------------------
    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], stopped: asyncio.Future[None]
    ) -> None:
        def post(items: list[_Outcome]) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, items)

        try:
            try:
                conn, lock = open_database(self.path, self.fsync, self.max_page_count)
            except Exception as exc:
                post([(ready, False, exc)])
                return
            try:
                post([(ready, True, None)])
                self._serve(conn, Tables(conn, self.max_page_count), post)
            finally:
                conn.close()
                lock.release()
        finally:
            post([(stopped, True, None)])

    def _serve(
        self, conn: sqlite3.Connection, tables: Tables, post: Callable[[list[_Outcome]], None]
    ) -> None:
        q = self._queue
        while True:
            job = q.get()
            batch: list[_Job] = []
            stop = False
            while True:
                if job is None:
                    stop = True
                    break
                batch.append(job)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    post(self._run_batch(conn, tables, batch))
                except Exception as exc:  # a bug or a broken connection: never leave callers hanging
                    tables.forget()
                    with contextlib.suppress(sqlite3.Error):
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                    error = self._error(exc)
                    post([(fut, False, error) for _, fut, _, _ in batch])
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, tables: Tables, batch: list[_Job]) -> list[_Outcome]:
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        todo = list(range(len(batch)))
        failed = self._optimistic(conn, tables, batch, todo, outcomes)
        if failed is not None:
            if failed >= 0:
                todo.remove(failed)
            # Each round either completes or drops the one job that made SQLite abandon the whole
            # transaction (it may do so on a full disk), then runs the others again.
            while (lost := self._transaction(conn, tables, batch, todo, outcomes)) is not None:
                todo.remove(lost)
        return [(batch[i][1], ok, value) for i, (ok, value) in enumerate(outcomes)]

    def _optimistic(
        self,
        conn: sqlite3.Connection,
        tables: Tables,
        batch: list[_Job],
        todo: list[int],
        outcomes: list[tuple[bool, Any]],
    ) -> int | None:
        """Run the jobs ``todo`` in one transaction without savepoints, channel rows written
        once before the commit. None when done; else everything was rolled back and the others
        are to run again, each in its savepoint: the index of the job that failed (its outcome
        set), or -1 when no job is to blame."""
        if not any(batch[i][2] for i in todo):
            return self._transaction(conn, tables, batch, todo, outcomes)  # reads: no savepoints
        try:
            # Deferred: the first write takes the lock, within a statement that runs long anyway.
            # BEGIN IMMEDIATE takes it at once, long enough for the event loop to take the GIL,
            # which this thread then waits for. (If the file is locked, the write fails and so
            # the savepoint round below fails at its BEGIN IMMEDIATE, as before.)
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            for i in todo:
                outcomes[i] = (False, translate(exc, self.path))
            return None
        tables.deferred = True
        try:
            for i in todo:
                fn, _, _, joins = batch[i]
                if not joins:
                    try:
                        tables.flush_rows()
                    except Exception:
                        self._roll_back(conn, tables)
                        return -1
                try:
                    outcomes[i] = (True, fn(tables))
                except Exception as exc:
                    outcomes[i] = (False, self._error(exc))
                    self._roll_back(conn, tables)
                    return i
            try:
                tables.flush()
            except Exception:
                self._roll_back(conn, tables)
                return -1
        finally:
            tables.deferred = False
        self._commit(conn, tables, todo, outcomes)
        return None

    def _roll_back(self, conn: sqlite3.Connection, tables: Tables) -> None:
        tables.forget()
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _transaction(
        self,
        conn: sqlite3.Connection,
        tables: Tables,
        batch: list[_Job],
        todo: list[int],
        outcomes: list[tuple[bool, Any]],
    ) -> int | None:
        """Run the jobs ``todo`` in one transaction; the index of a job that cost the whole
        transaction (to be run again without it), or None when done."""
        writing = any(batch[i][2] for i in todo)
        try:
            if writing:
                conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for i in todo:
                outcomes[i] = (False, translate(exc, self.path))
            return None
        for i in todo:
            fn, _, write, _ = batch[i]
            try:
                if write:
                    conn.execute("SAVEPOINT op")
                value = fn(tables)
            except Exception as exc:
                tables.forget()
                outcomes[i] = (False, self._error(exc))
                if writing:
                    if write and conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK TO op")
                            conn.execute("RELEASE op")
                        except sqlite3.Error:
                            if conn.in_transaction:
                                conn.execute("ROLLBACK")
                    if not conn.in_transaction:  # SQLite gave up the whole transaction
                        return i
                continue
            outcomes[i] = (True, value)
            if write:
                conn.execute("RELEASE op")
        if writing:
            self._commit(conn, tables, todo, outcomes)
        return None

    def _commit(
        self, conn: sqlite3.Connection, tables: Tables, todo: list[int], outcomes: list[tuple[bool, Any]]
    ) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            tables.forget()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for i in todo:
                outcomes[i] = (False, translate(exc, self.path))
            return
        self.commits += 1
        if tables.vacuum_due:
            pages, tables.vacuum_due = tables.vacuum_due, 0
            try:
                # Outside the transaction (executescript commits first): it steps the pragma to
                # the end in one call, where execute() would give back one page per call.
                conn.executescript(f"PRAGMA incremental_vacuum({pages})")
                # Let the file shrink by the pages given back. TRUNCATE waits (the busy
                # timeout, seconds) for readers to move on, and every write waited with it: the
                # latency benchmark on SQLite saw 250-650 ms stalls. Without waiting, a busy
                # moment leaves the truncation to the next vacuum.
                busy = conn.execute("PRAGMA busy_timeout").fetchone()[0]
                conn.execute("PRAGMA busy_timeout = 0")
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    conn.execute(f"PRAGMA busy_timeout = {int(busy)}")
            except sqlite3.Error:  # only space not given back yet
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        return None

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, sqlite3.Error):
            return translate(exc, self.path)
        return exc  # our own errors, and bugs, as they are

    # -- submitting --------------------------------------------------------------------------
    def _op(self, write: bool, fn: Callable[[Tables], T], *, joins: bool = False) -> asyncio.Future[T]:
        loop = self._loop
        if not self._open or loop is None:
            raise Unavailable(f"the store at {self.path} is not open (not started, or closed)")
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, write, joins))
        return fut

    async def pragma(self, name: str) -> object:
        """The value of ``PRAGMA name`` on the store's connection (diagnostics and tests)."""
        return await self._op(False, lambda t: t.pragma(name))

    # -- the log -----------------------------------------------------------------------------
    async def ensure_channel(self, channel: str, policy: ChannelPolicy, now: float) -> bool:
        return await self._op(True, lambda t: t.ensure_channel(channel, policy))

    async def append(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[AppendResult]:
        batch = list(messages)  # the thread reads it later: a copy the caller cannot change
        results = await self._op(True, lambda t: t.append(channel, batch, now, policy), joins=True)
        if isinstance(results, Refused):
            raise results.error
        for r in results:
            if not r.duplicate:
                self._wake(channel)
                break
        return results

    async def read_range(self, channel: str, after_seq: int, limit: int) -> list[Stored]:
        return await self._op(False, lambda t: t.read_range(channel, after_seq, limit))

    async def last_seq(self, channel: str) -> int:
        return await self._op(False, lambda t: t.last_seq(channel))

    # -- groups ------------------------------------------------------------------------------
    async def ensure_group(self, channel: str, group: str, start: StartSpec, now: float) -> bool:
        return await self._op(True, lambda t: t.ensure_group(channel, group, start))

    async def read_new(
        self, channel: str, group: str, consumer: str, limit: int, deadline: float
    ) -> list[Stored]:
        return await self._op(
            True, lambda t: t.read_new(channel, group, consumer, limit, deadline), joins=True
        )

    async def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        return await self._op(True, lambda t: t.claim_expired(channel, group, consumer, limit, now, deadline))

    async def next_deadline(self, channel: str, group: str) -> float | None:
        return await self._op(False, lambda t: t.next_deadline(channel, group))

    async def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        done = tuple(seqs)
        return await self._op(True, lambda t: t.ack(channel, group, done), joins=True)

    async def nack(
        self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str
    ) -> int:
        which = tuple(seqs)
        return await self._op(True, lambda t: t.nack(channel, group, which, visible_at, reason), joins=True)

    async def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        which = tuple(seqs)
        return await self._op(True, lambda t: t.extend(channel, group, which, deadline), joins=True)

    async def pending(self, channel: str, group: str, limit: int = 1000) -> list[PendingEntry]:
        return await self._op(False, lambda t: t.pending(channel, group, limit))

    async def groups(self, channel: str) -> list[str]:
        return await self._op(False, lambda t: t.groups(channel))

    async def delete_group(self, channel: str, group: str) -> bool:
        return await self._op(True, lambda t: t.delete_group(channel, group))

    async def dead_letter(
        self, channel: str, group: str, messages: Sequence[Stored], now: float, policy: ChannelPolicy
    ) -> None:
        """Append to ``<channel>.dead-letter`` and ack in the origin group, in one transaction."""
        if not messages:
            return
        moved = list(messages)
        if await self._op(True, lambda t: t.dead_letter(channel, group, moved, now, policy)):
            self._wake(channel + DEAD_LETTER_SUFFIX)

    # -- retention and admin -----------------------------------------------------------------
    async def trim(
        self, channel: str, policy: ChannelPolicy, now: float, keep_from: int | None = None
    ) -> TrimReport:
        return await self._op(True, lambda t: t.trim(channel, policy, now, keep_from))

    async def channels(self) -> list[str]:
        return await self._op(False, lambda t: t.channels())

    async def stats(self, channel: str) -> ChannelStats | None:
        return await self._op(False, lambda t: t.stats(channel))

    async def purge(self, channel: str) -> int:
        return await self._op(True, lambda t: t.purge(channel))

    async def delete(self, channel: str) -> bool:
        return await self._op(True, lambda t: t.delete(channel))


__all__ = ["SQLiteStore"]
