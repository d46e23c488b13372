"""The SQLite store's rows and caches: what every operation module builds on.

Operations run only on the store's writer thread, inside the group-commit transaction (each
write in its own savepoint), so they read, write and keep caches without locks. A cached
channel mirrors its row in ``channels`` (plus its groups' rows); every change to it is written
to the tables in the same operation, so dropping the caches (after a rollback) loses nothing.

The messages of a channel are always the contiguous seqs ``first_seq..last_seq``: they leave
only from the front (trim, drop-oldest) or all at once (purge), as in the memory store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pushchannel.core.model import DEFAULT_GROUP, Stored
from pushchannel.errors import InvalidArgument, ResourceExhausted

EXPIRED_REASON = "ack deadline exceeded"
#: The columns a Stored is made of, in _stored's order.
COLS = "seq, id, payload, attributes, publish_time, expires_at"
_MAX_CACHED_CHANNELS = 100_000

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

    def depth(self) -> int:
        return self.last_seq + 1 - self.first_seq


@dataclass(slots=True)
class Refused:
    """An operation's answer that is an error, while what it did so far stays committed."""

    error: ResourceExhausted


class TablesBase:
    """The connection, the channel cache and the lookups every operation uses."""

    def __init__(self, conn: sqlite3.Connection, max_page_count: int | None = None) -> None:
        self.conn = conn
        # Appends stop this far below the cap, so that consuming, acking and trimming (which
        # need a few pages too) still work on a full store and can make room again.
        self._append_limit = (
            None if max_page_count is None else max_page_count - max(1, min(1024, max_page_count // 8))
        )
        self._channels: dict[str, CachedChannel] = {}
        #: Set when pages were given back: a WAL checkpoint after the commit shrinks the file.
        self.checkpoint_due = False

    def forget(self) -> None:
        """Drop the caches (after a rollback): they are reloaded from the tables."""
        self._channels.clear()

    def _get(self, name: str) -> CachedChannel | None:
        ch = self._channels.get(name)
        if ch is not None:
            return ch
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
            self._channels.clear()  # crude, rare, and safe: the tables have it all
        self._channels[name] = ch
        return ch

    def _create(self, name: str, default_group: bool) -> CachedChannel:
        cur = self.conn.execute("INSERT INTO channels (name) VALUES (?)", (name,))
        assert cur.lastrowid is not None
        ch = CachedChannel(cur.lastrowid, 0, 1, 0, 0)
        if default_group:
            self._add_group(ch, DEFAULT_GROUP, 0)
        return self._remember(name, ch)

    def _save(self, ch: CachedChannel) -> None:
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
                "SELECT min(seq) FROM pending WHERE grp = ?", (g.id,)
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
