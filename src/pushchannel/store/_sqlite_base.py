"""The SQLite store's rows and caches: what every operation module builds on.

Operations run only on the store's writer thread, inside the group-commit transaction, so they
read, write and keep caches without locks. A cached channel mirrors its row in ``channels``
(plus its groups' rows). Every change to it is written to the tables in the same operation, or,
while :attr:`TablesBase.deferred` is set (a transaction that is rolled back as a whole if any of
its operations fails), by :meth:`TablesBase.flush` before the commit: so dropping the caches
(after a rollback) loses nothing.

A channel with groups also keeps the messages appended most recently (``recent``), as they
were stored: read_new hands them out from there while the groups keep up, without reading them
back from the file. What is cached is always the tail of the log (nothing below first_seq).

The messages of a channel are always the contiguous seqs ``first_seq..last_seq``: they leave
only from the front (trim, drop-oldest) or all at once (purge), as in the memory store.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pushchannel.core.model import DEFAULT_GROUP, Stored
from pushchannel.errors import InvalidArgument, ResourceExhausted

EXPIRED_REASON = "ack deadline exceeded"
#: The columns a Stored is made of, in _stored's order.
COLS = "seq, id, payload, attributes, publish_time, expires_at"
_MAX_CACHED_CHANNELS = 100_000
#: Messages kept for read_new (``CachedChannel.recent``), all channels together: their bytes
#: plus this much each for the Python objects, at most _RECENT_BUDGET (then they are dropped).
_RECENT_OVERHEAD = 160
_RECENT_BUDGET = 32 << 20

Row = tuple[int, str, bytes, "str | None", float, float]


def attributes_size(attributes: Mapping[str, str]) -> int:
    """The UTF-8 bytes of the keys and values (joined: no Python loop per pair)."""
    keys = "".join(attributes)
    values = "".join(attributes.values())
    return (len(keys) if keys.isascii() else len(keys.encode())) + (
        len(values) if values.isascii() else len(values.encode())
    )


# Built once: json.dumps/loads with options build a new encoder on every call.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
_decode_json = json.JSONDecoder().raw_decode


def encode_attributes(attributes: Mapping[str, str]) -> str:
    """A compact JSON object (read back by :func:`stored`)."""
    return _encode_json(attributes if isinstance(attributes, dict) else dict(attributes))


def stored(row: Row) -> Stored:
    raw = row[3]
    attributes: dict[str, str] = _decode_json(raw)[0] if raw else {}
    return Stored(row[0], row[1], row[2], attributes, row[4], row[5])


def seq_set(seqs: Iterable[int]) -> str:
    """Seqs as the JSON array that ``json_each(?)`` turns into a set in SQL: one statement
    for a whole batch instead of a step per seq."""
    return json.dumps(list(seqs))


#: Appends to one channel in one transaction share a single INSERT (see TablesBase.flush_rows):
#: the messages' seqs follow ?2 and their payloads are slices of one BLOB (?3), one after the
#: other. ?4 is a JSON array with per message its size (a message without id, attributes and
#: ttl: the payload's length) or [payload length, size, id, attributes]. Their publish times
#: come as parameters, for up to SLOTS appends: the append of the message at index k is the
#: first whose bound (?5, ?7, ...) is above k, its time the parameter after that bound.
SLOTS = 16
INSERT_JOINED = (
    "INSERT INTO messages (channel_id, seq, id, payload, attributes, publish_time, expires_at, size)"
    " SELECT ?1, ?2 + key, CASE WHEN plain THEN '' ELSE json_extract(value, '$[2]') END,"
    " ifnull(substr(?3, off - len + 1, len), x''),"
    " CASE WHEN plain THEN NULL ELSE json_extract(value, '$[3]') END,"
    " CASE"
    + "".join(f" WHEN key < ?{5 + 2 * i} THEN ?{6 + 2 * i}" for i in range(SLOTS))
    + " END, 0.0, CASE WHEN plain THEN len ELSE json_extract(value, '$[1]') END"
    " FROM (SELECT key, value, plain, len, sum(len) OVER (ORDER BY key ROWS UNBOUNDED PRECEDING) AS off"
    " FROM (SELECT key, value, type = 'integer' AS plain,"
    " CASE WHEN type = 'integer' THEN value ELSE json_extract(value, '$[0]') END AS len FROM json_each(?4)))"
)
#: Joined payloads are written once they reach this many bytes.
JOINED_MAX_BYTES = 4 << 20
#: INSERT_JOINED's window function needs SQLite 3.25; before it, every append inserts its own.
CAN_JOIN = sqlite3.sqlite_version_info >= (3, 25, 0)
NO_SLOT = (1 << 62, 0.0)
encode_meta = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


@dataclass(slots=True)
class Joined:
    """Messages appended to one channel in this transaction, not written yet."""

    first: int  # the seq of the first
    payloads: list[bytes] = field(default_factory=list)
    meta: list[object] = field(default_factory=list)
    bounds: list[tuple[int, float]] = field(default_factory=list)  # (index bound, publish time)
    nbytes: int = 0


@dataclass(slots=True)
class CachedGroup:
    id: int
    cursor: int


@dataclass(slots=True)
class CachedChannel:
    """A cached copy of a channel's row, plus what follows from it."""

    id: int
    last_seq: int
    first_seq: int
    nbytes: int
    dropped: int
    groups: dict[str, CachedGroup] = field(default_factory=dict)
    #: The messages recent_base..last_seq as stored (empty: none cached).
    recent: list[Stored] = field(default_factory=list)
    recent_base: int = 0
    #: (last seq, budget bytes) of each append in ``recent``, oldest first.
    #: None while nothing is cached: an empty deque still holds a 64-slot block (0.6 KB per
    #: channel, one channel per host in the usual layout).
    recent_chunks: deque[tuple[int, int]] | None = None
    recent_bytes: int = 0
    #: Every dedupe row of the channel has a time at or after this (inf: none; None: unknown).
    dedupe_low: float | None = None

    def depth(self) -> int:
        return self.last_seq + 1 - self.first_seq

    def cached(self, start: int, limit: int) -> list[Stored] | None:
        """Up to ``limit`` messages from seq ``start`` on (start >= first_seq) out of
        ``recent``; None when they are not all there."""
        recent = self.recent
        i = start - self.recent_base
        if not recent or i < 0 or recent[-1].seq != self.last_seq:
            return None if start <= self.last_seq else []
        return recent[i : i + limit]


@dataclass(slots=True)
class Refused:
    """An operation's answer that is an error, while what it did so far stays committed."""

    error: ResourceExhausted


class TablesBase:
    """The connection, the channel cache and the lookups every operation uses.

    While :attr:`deferred` is set, appends leave their messages in ``_joined`` and
    :meth:`flush_rows` writes them (see :data:`INSERT_JOINED`): the writer calls it before any
    operation other than an append, read_new, ack, nack or extend and before the commit, and
    every method that reads or deletes messages calls it first. Each statement the writer runs
    lets the event loop take the GIL, and then waits for it back: fewer, longer statements spare
    it that wait after every append.
    """

    def __init__(self, conn: sqlite3.Connection, max_page_count: int | None = None) -> None:
        self.conn = conn
        # Appends stop this far below the cap, so that consuming, acking and trimming (which
        # need a few pages too) still work on a full store and can make room again.
        self._append_limit = (
            None if max_page_count is None else max_page_count - max(1, min(1024, max_page_count // 8))
        )
        self._channels: dict[str, CachedChannel] = {}
        #: Free pages to give back to the file system after the commit (then a WAL checkpoint
        #: shrinks the file).
        self.vacuum_due = 0
        #: While set, channel rows are written by flush() (before the commit), not by each change.
        self.deferred = False
        self._dirty: dict[int, CachedChannel] = {}
        self._recent_total = 0  # budget bytes in every channel's ``recent``
        self._joined: dict[int, Joined] = {}

    def forget(self) -> None:
        """Drop the caches (after a rollback): they are reloaded from the tables."""
        self._channels.clear()
        self._dirty.clear()
        self._recent_total = 0
        self.vacuum_due = 0
        self._joined.clear()

    def flush(self) -> None:
        """Write what was deferred: messages and channel rows."""
        self.flush_rows()
        dirty = self._dirty
        if dirty:
            self.conn.executemany(
                "UPDATE channels SET last_seq = ?, bytes = ?, dropped = ? WHERE id = ?",
                [(ch.last_seq, ch.nbytes, ch.dropped, ch.id) for ch in dirty.values()],
            )
            dirty.clear()

    def flush_rows(self) -> None:
        """Write the messages that appends left in ``_joined``."""
        if not self._joined:
            return
        joined = list(self._joined.items())
        self._joined.clear()
        for cid, j in joined:
            slots = [x for bound in j.bounds for x in bound]
            slots += NO_SLOT * (SLOTS - len(j.bounds))
            self.conn.execute(
                INSERT_JOINED, (cid, j.first, b"".join(j.payloads), encode_meta(j.meta), *slots)
            )

    def _join(self, ch: CachedChannel, fresh: list[Stored], meta: list[object], now: float) -> None:
        """Leave an append's messages to flush_rows()."""
        joined = self._joined.get(ch.id)
        if joined is not None and (len(joined.bounds) >= SLOTS or joined.nbytes >= JOINED_MAX_BYTES):
            self.flush_rows()
            joined = None
        if joined is None:
            joined = self._joined[ch.id] = Joined(fresh[0].seq)
        payloads = [m.payload for m in fresh]
        joined.payloads += payloads
        joined.meta += meta
        joined.bounds.append((len(joined.meta), now))
        joined.nbytes += sum(map(len, payloads))

    def _after(self, ch: CachedChannel, after_seq: int, limit: int) -> list[Stored]:
        """Up to ``limit`` messages of ``ch`` after ``after_seq``: from the cached tail when it
        has them all, else from the file."""
        hit = ch.cached(max(after_seq + 1, ch.first_seq), limit)
        if hit is not None:
            return hit
        self.flush_rows()
        rows = self.conn.execute(
            f"SELECT {COLS} FROM messages WHERE channel_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (ch.id, after_seq, limit),
        ).fetchall()
        return [stored(r) for r in rows]

    # -- recent messages -----------------------------------------------------------------------
    def _cache_recent(self, ch: CachedChannel, fresh: list[Stored], nbytes: int) -> None:
        """Keep messages just appended to ``ch`` (the next after its last cached one)."""
        recent = ch.recent
        if recent and recent[-1].seq + 1 != fresh[0].seq:  # appended to while it had no group
            self._uncache(ch, recent[-1].seq + 1)
        if not recent:
            ch.recent_base = fresh[0].seq
        recent += fresh
        cost = nbytes + _RECENT_OVERHEAD * len(fresh)
        chunks = ch.recent_chunks
        if chunks is None:
            chunks = ch.recent_chunks = deque()
        chunks.append((fresh[-1].seq, cost))
        ch.recent_bytes += cost
        self._recent_total += cost
        if self._recent_total > _RECENT_BUDGET:
            for other in self._channels.values():
                self._uncache(other, other.last_seq + 1)

    def _uncache(self, ch: CachedChannel, end: int) -> None:
        """Drop the cached messages below seq ``end``."""
        recent = ch.recent
        if not recent or end <= ch.recent_base:
            return
        if end > recent[-1].seq:
            recent.clear()
            ch.recent_chunks = None
            self._recent_total -= ch.recent_bytes
            ch.recent_bytes = 0
            return
        del recent[: end - ch.recent_base]
        ch.recent_base = end
        chunks = ch.recent_chunks
        assert chunks is not None  # made with the first cached message
        while chunks and chunks[0][0] < end:
            freed = chunks.popleft()[1]
            ch.recent_bytes -= freed
            self._recent_total -= freed

    def _get(self, name: str) -> CachedChannel | None:
        ch = self._channels.get(name)
        if ch is not None:
            return ch
        self.flush_rows()  # also after the cache was cleared: defensive
        conn = self.conn
        row = conn.execute(
            "SELECT id, last_seq, bytes, dropped FROM channels WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        cid, last_seq, nbytes, dropped = row
        first = conn.execute("SELECT min(seq) FROM messages WHERE channel_id = ?", (cid,)).fetchone()[0]
        ch = CachedChannel(cid, last_seq, last_seq + 1 if first is None else first, nbytes, dropped)
        for gid, gname, cursor in conn.execute(
            "SELECT id, name, cursor FROM groups WHERE channel_id = ?", (cid,)
        ):
            ch.groups[gname] = CachedGroup(gid, cursor)
        return self._remember(name, ch)

    def _remember(self, name: str, ch: CachedChannel) -> CachedChannel:
        if len(self._channels) >= _MAX_CACHED_CHANNELS:
            self.flush()  # crude, rare, and safe: the tables have it all
            self._channels.clear()
            self._recent_total = 0
        self._channels[name] = ch
        return ch

    def _forget_channel(self, name: str, ch: CachedChannel) -> None:
        self._uncache(ch, ch.last_seq + 1)
        self._dirty.pop(ch.id, None)
        self._channels.pop(name, None)

    def _create(self, name: str, default_group: bool) -> CachedChannel:
        cur = self.conn.execute("INSERT INTO channels (name) VALUES (?)", (name,))
        assert cur.lastrowid is not None
        ch = CachedChannel(cur.lastrowid, 0, 1, 0, 0)
        if default_group:
            self._add_group(ch, DEFAULT_GROUP, 0)
        return self._remember(name, ch)

    def _save(self, ch: CachedChannel) -> None:
        if self.deferred:
            self._dirty[ch.id] = ch
            return
        self.conn.execute(
            "UPDATE channels SET last_seq = ?, bytes = ?, dropped = ? WHERE id = ?",
            (ch.last_seq, ch.nbytes, ch.dropped, ch.id),
        )

    def _add_group(self, ch: CachedChannel, name: str, cursor: int) -> None:
        cur = self.conn.execute(
            "INSERT INTO groups (channel_id, name, cursor) VALUES (?, ?, ?)", (ch.id, name, cursor)
        )
        assert cur.lastrowid is not None
        ch.groups[name] = CachedGroup(cur.lastrowid, cursor)

    def _group(self, channel: str, group: str) -> tuple[CachedChannel, CachedGroup] | None:
        ch = self._get(channel)
        if ch is None:
            return None
        g = ch.groups.get(group)
        return None if g is None else (ch, g)

    def _floor(self, ch: CachedChannel) -> int:
        """The lowest seq some group still needs (last_seq + 1: none)."""
        floor = ch.last_seq + 1
        for g in ch.groups.values():
            low: int | None = self.conn.execute(
                "SELECT min(s) FROM (SELECT min(seq) AS s FROM pending WHERE grp = ?"
                " UNION ALL SELECT min(first_seq) FROM pending_ranges WHERE grp = ?)",
                (g.id, g.id),
            ).fetchone()[0]
            floor = min(floor, g.cursor + 1 if low is None else min(low, g.cursor + 1))
        return floor

    def _pages_used(self) -> int:
        conn = self.conn
        pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
        free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages - free

    def pragma(self, name: str) -> object:
        if not name.isidentifier():
            raise InvalidArgument(f"not a pragma name: {name!r}")
        row = self.conn.execute(f"PRAGMA {name}").fetchone()
        return None if row is None else row[0]
