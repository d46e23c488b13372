"""The SQLite store's operations, one method per store call: the log, retention and admin here,
groups in :mod:`._sqlite_groups`. Each mirrors the memory store's behaviour."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from itertools import repeat

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
    AppendResult,
    ChannelPolicy,
    ChannelStats,
    GroupStats,
    NewMessage,
    Stored,
    TrimReport,
)
from pushchannel.errors import ResourceExhausted
from pushchannel.store._sqlite_base import (
    CAN_JOIN,
    JOINED_MAX_BYTES,
    CachedChannel,
    Refused,
    attributes_size,
    encode_attributes,
)
from pushchannel.store._sqlite_groups import GroupOps

#: Give pages back to the file system once this many are free (4 KiB each)...
_VACUUM_AT = 2048
#: ...keeping this many for the next appends, and at most this many per trim (about 50 ms).
_VACUUM_KEEP = 256
_VACUUM_MAX = 4096

#: Rows per INSERT: a few fixed sizes, each a cached statement (a round hundred, the usual
#: batch, in one). At most 8 * 100 values: SQLite before 3.32 allows no more than 999.
_CHUNKS = (100, 64, 32, 16, 8, 4, 2, 1)


class _MultiInsert:
    """Multi-row INSERTs of a few fixed sizes (each a cached statement): far fewer steps through
    the sqlite3 module than executemany's one row at a time."""

    def __init__(self, head: str, fields: int) -> None:
        self.fields = fields
        row = "(" + ", ".join(["?"] * fields) + ")"
        self.sql = {n: head + " VALUES " + ", ".join([row] * n) for n in _CHUNKS}

    def run(self, conn: sqlite3.Connection, flat: list[object]) -> None:
        """Insert the rows whose values are ``flat``, one row after the other."""
        fields = self.fields
        count = len(flat) // fields
        done = 0
        for chunk, sql in self.sql.items():
            while count - done >= chunk:
                conn.execute(sql, flat[done * fields : (done + chunk) * fields])
                done += chunk


_INSERT_MESSAGES = _MultiInsert(
    "INSERT INTO messages (channel_id, seq, id, payload, attributes, publish_time, expires_at, size)", 8
)
_INSERT_IDS = _MultiInsert("INSERT OR REPLACE INTO dedupe (channel_id, id, seq, time)", 4)

__all__ = ["Refused", "Tables"]


#: A tuple subclass (AppendResult) made in C, without its Python-level __new__.
_new_tuple = tuple.__new__


def _over(ch: CachedChannel, policy: ChannelPolicy, count: int, added: int) -> bool:
    return ch.depth() + count > policy.max_messages or ch.nbytes + added > policy.max_bytes


class Tables(GroupOps):
    """The store's operations over one connection. Not thread-safe: the writer thread's only."""

    def ensure_channel(self, channel: str, policy: ChannelPolicy) -> bool:
        if self._get(channel) is not None:
            return False
        self._create(channel, policy.default_group)
        return True

    def append(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[AppendResult] | Refused:
        ch = self._get(channel) or self._create(channel, policy.default_group)
        cid = ch.id
        window = policy.dedupe_window
        self._prune_dedupe(ch, now - window)
        ids = [m.id for m in messages if m.id]
        fresh_ids: list[object] = []  # dedupe rows' values, one after the other
        # Per message: its size, or [payload length, size, id, attributes] (see INSERT_JOINED).
        meta: list[object]
        if not ids and not any(m.attributes or m.ttl > 0 for m in messages):
            # The usual batch: no ids, no attributes, no ttl. C loops rather than a Python one.
            first = ch.last_seq + 1
            seqs = range(first, first + len(messages))
            payloads = [m.payload for m in messages]
            meta = list(map(len, payloads))
            added: int = sum(meta)  # type: ignore[arg-type]
            results = list(map(_new_tuple, repeat(AppendResult), zip(seqs, repeat(False))))
            fresh = list(
                map(Stored, seqs, repeat(""), payloads, (m.attributes for m in messages), repeat(now))
            )
            timed = False
        else:
            results, fresh, meta, added, timed = self._rows(ch, messages, now, ids, fresh_ids)
        count = len(fresh)
        if not count:
            return results
        if policy.discard == "reject" and _over(ch, policy, count, added):
            # Make room from what no group needs any more (kept even if the append is refused).
            if self._trim_acked(ch, None):
                self._save(ch)
            if _over(ch, policy, count, added):
                return Refused(
                    ResourceExhausted(
                        f"channel '{channel}' is full (max_messages={policy.max_messages}, "
                        f"max_bytes={policy.max_bytes}, discard=reject): "
                        "consume or purge it, or raise its limits"
                    )
                )
        if (
            CAN_JOIN
            and self.deferred
            and self._append_limit is None
            and not timed
            and added <= JOINED_MAX_BYTES
            and not (fresh_ids and any("\x00" in i for i in ids))  # SQLite's JSON stops at NUL
        ):
            self._join(ch, fresh, meta, now)
        else:
            self.flush_rows()
            flat: list[object] = []  # the rows' values, one after the other
            for m, row in zip(fresh, meta, strict=True):
                size, encoded = (row, None) if isinstance(row, int) else row[1::2]  # type: ignore[index]
                flat += (cid, m.seq, m.id, m.payload, encoded, now, m.expires_at, size)
            _INSERT_MESSAGES.run(self.conn, flat)
        if window > 0 and fresh_ids:
            _INSERT_IDS.run(self.conn, fresh_ids)
            if ch.dedupe_low is not None:
                ch.dedupe_low = min(ch.dedupe_low, now)
        if ch.groups:
            self._cache_recent(ch, fresh, added)
        ch.last_seq += count
        ch.nbytes += added
        if policy.discard == "drop-oldest":
            ch.dropped += self._enforce_size(ch, policy)
        self._save(ch)
        if self._append_limit is not None and self._pages_used() > self._append_limit:
            raise ResourceExhausted(
                f"store is full: it reached its size cap ({self._append_limit} pages for messages): "
                "consume, purge or delete channels, lower the retention limits, or raise the cap"
            )  # the savepoint undoes this append
        return results

    def _rows(
        self,
        ch: CachedChannel,
        messages: Sequence[NewMessage],
        now: float,
        ids: list[str],
        fresh_ids: list[object],
    ) -> tuple[list[AppendResult], list[Stored], list[object], int, bool]:
        """An append's results, new messages, their meta (see INSERT_JOINED), their bytes and
        whether any has a ttl; the dedupe rows go to ``fresh_ids``."""
        cid = ch.id
        known = self._known_ids(cid, ids) if ids else {}
        results: list[AppendResult] = []
        fresh: list[Stored] = []
        meta: list[object] = []
        timed = False
        seq = ch.last_seq
        added = 0
        for m in messages:
            mid = m.id
            if mid:
                hit = known.get(mid)
                if hit is not None:
                    results.append(AppendResult(hit, True))
                    continue
                known[mid] = seq + 1
                fresh_ids += (cid, mid, seq + 1, now)
            seq += 1
            results.append(AppendResult(seq, False))
            payload = m.payload
            attributes = m.attributes
            if attributes:
                size = len(payload) + attributes_size(attributes)
                encoded = encode_attributes(attributes)
                attributes = dict(attributes)
            else:
                size = len(payload)
                encoded = None
            added += size
            ttl = m.ttl
            if ttl > 0:
                timed = True
                expires = now + ttl
            else:
                expires = 0.0
            meta.append([len(payload), size, mid, encoded])
            fresh.append(Stored(seq, mid, payload, attributes, now, expires))
        return results, fresh, meta, added, timed

    def _known_ids(self, cid: int, ids: list[str]) -> dict[str, int]:
        """The seqs stored (within the window: the rest was pruned) under these ids."""
        if any("\x00" in i for i in ids):  # SQLite's JSON stops at NUL: look them up one by one
            found = {}
            for i in ids:
                row = self.conn.execute(
                    "SELECT seq FROM dedupe WHERE channel_id = ? AND id = ?", (cid, i)
                ).fetchone()
                if row is not None:
                    found[i] = row[0]
            return found
        rows = self.conn.execute(
            "SELECT j.value, d.seq FROM json_each(?) AS j CROSS JOIN dedupe AS d"
            " ON d.channel_id = ? AND d.id = j.value",
            (json.dumps(ids, ensure_ascii=False), cid),
        )
        return dict(rows.fetchall())

    def _prune_dedupe(self, ch: CachedChannel, horizon: float) -> None:
        """Forget the ids stored at or before ``horizon`` (skipped when there are none)."""
        low = ch.dedupe_low
        if low is None:
            low = self.conn.execute("SELECT min(time) FROM dedupe WHERE channel_id = ?", (ch.id,)).fetchone()[
                0
            ]
            if low is None:
                low = math.inf
        if low <= horizon:
            n = self.conn.execute(
                "DELETE FROM dedupe WHERE channel_id = ? AND time <= ?", (ch.id, horizon)
            ).rowcount
            low = horizon if n else None  # None: look the oldest up again next time
        ch.dedupe_low = low

    def _drop_front(self, ch: CachedChannel, n: int) -> None:
        # Two statements, each one step: RETURNING would step (and pass the GIL) once per row.
        self.flush_rows()
        end = ch.first_seq + n
        conn = self.conn
        freed: int = conn.execute(
            "SELECT total(size) FROM messages WHERE channel_id = ? AND seq >= ? AND seq < ?",
            (ch.id, ch.first_seq, end),
        ).fetchone()[0]
        conn.execute("DELETE FROM messages WHERE channel_id = ? AND seq < ?", (ch.id, end))
        ch.nbytes -= int(freed)
        ch.first_seq = end
        self._uncache(ch, end)

    def _enforce_size(self, ch: CachedChannel, policy: ChannelPolicy) -> int:
        n = 0
        over = ch.depth() - policy.max_messages
        if over > 0:
            self._drop_front(ch, over)
            n += over
        if ch.nbytes > policy.max_bytes and ch.depth() > 0:
            self.flush_rows()
            excess = ch.nbytes - policy.max_bytes
            count = freed = 0
            cur = self.conn.execute(
                "SELECT size FROM messages WHERE channel_id = ? AND seq >= ? ORDER BY seq",
                (ch.id, ch.first_seq),
            )
            try:
                while freed < excess:
                    batch = cur.fetchmany(256)
                    if not batch:
                        break
                    for (size,) in batch:
                        count += 1
                        freed += size
                        if freed >= excess:
                            break
            finally:
                cur.close()
            self._drop_front(ch, count)
            n += count
        return n

    def read_range(self, channel: str, after_seq: int, limit: int) -> list[Stored]:
        ch = self._get(channel)
        if ch is None or limit <= 0:
            return []
        return self._after(ch, after_seq, limit)

    def last_seq(self, channel: str) -> int:
        ch = self._get(channel)
        return 0 if ch is None else ch.last_seq

    def dead_letter(
        self, channel: str, group: str, messages: Sequence[Stored], now: float, policy: ChannelPolicy
    ) -> bool:
        """Append to the dead-letter channel and ack, in this one operation (one savepoint)."""
        moved = [
            NewMessage(
                payload=m.payload,
                attributes={
                    **m.attributes,
                    "pushchannel.origin_channel": channel,
                    "pushchannel.origin_group": group,
                    "pushchannel.origin_seq": str(m.seq),
                    "pushchannel.attempts": str(m.attempt - 1),
                    "pushchannel.reason": m.reason,
                },
            )
            for m in messages
        ]
        results = self.append(channel + DEAD_LETTER_SUFFIX, moved, now, policy)
        if isinstance(results, Refused):
            raise results.error  # the savepoint undoes the whole move
        self.ack(channel, group, [m.seq for m in messages])
        return bool(results)

    def trim(self, channel: str, policy: ChannelPolicy, now: float, keep_from: int | None) -> TrimReport:
        report = TrimReport()
        ch = self._get(channel)
        if ch is None:
            return report
        self.flush_rows()
        report.acked = self._trim_acked(ch, keep_from)
        if ch.depth():
            report.aged, report.expired = self._count_old(ch, now - policy.max_age, now)
            if report.aged + report.expired:
                self._drop_front(ch, report.aged + report.expired)
        report.dropped = self._enforce_size(ch, policy)
        ch.dropped += report.aged + report.dropped
        self._prune_dedupe(ch, now - policy.dedupe_window)
        if report.total:
            self._save(ch)
            self._maybe_vacuum()
        if ch.depth():
            row = self.conn.execute(
                "SELECT publish_time FROM messages WHERE channel_id = ? AND seq >= ? ORDER BY seq LIMIT 1",
                (ch.id, ch.first_seq),
            ).fetchone()
            report.oldest = row[0] if row else 0.0
        return report

    def _trim_acked(self, ch: CachedChannel, keep_from: int | None) -> int:
        """Drop what every group has acked (and is below ``keep_from``); how many."""
        floor = self._floor(ch)
        if keep_from is not None:
            floor = min(floor, keep_from)
        n = max(0, min(floor, ch.last_seq + 1) - ch.first_seq)
        if n:
            self._drop_front(ch, n)
        return n

    def _count_old(self, ch: CachedChannel, horizon: float, now: float) -> tuple[int, int]:
        """From the front: how many are older than ``horizon``, then how many of the rest
        have expired (ttl), stopping at the first that is neither."""
        self.flush_rows()
        aged = expired = 0
        aging = True
        cur = self.conn.execute(
            "SELECT publish_time, expires_at FROM messages WHERE channel_id = ? AND seq >= ? ORDER BY seq",
            (ch.id, ch.first_seq),
        )
        try:
            size = 16
            while True:
                rows = cur.fetchmany(size)
                if not rows:
                    return aged, expired
                for publish_time, expires_at in rows:
                    if aging and publish_time < horizon:
                        aged += 1
                    elif 0.0 < expires_at <= now:
                        aging = False
                        expired += 1
                    else:
                        return aged, expired
                size = 512
        finally:
            cur.close()

    def _maybe_vacuum(self) -> None:
        free: int = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= _VACUUM_AT:
            # Bounded, so one trim never stalls the writer; done right after the commit.
            self.vacuum_due = min(free - _VACUUM_KEEP, _VACUUM_MAX)

    def channels(self) -> list[str]:
        return sorted(r[0] for r in self.conn.execute("SELECT name FROM channels"))

    def stats(self, channel: str) -> ChannelStats | None:
        ch = self._get(channel)
        if ch is None:
            return None
        self.flush_rows()
        conn = self.conn
        groups = [
            GroupStats(
                name,
                g.cursor,
                max(0, ch.last_seq - g.cursor),
                conn.execute(
                    "SELECT (SELECT count(*) FROM pending WHERE grp = ?)"
                    " + (SELECT ifnull(sum(last_seq - first_seq + 1), 0) FROM pending_ranges WHERE grp = ?)",
                    (g.id, g.id),
                ).fetchone()[0],
            )
            for name, g in sorted(ch.groups.items())
        ]
        depth = ch.depth()
        oldest = 0.0
        if depth:
            oldest = conn.execute(
                "SELECT publish_time FROM messages WHERE channel_id = ? AND seq = ?", (ch.id, ch.first_seq)
            ).fetchone()[0]
        return ChannelStats(
            name=channel,
            depth=depth,
            bytes=ch.nbytes,
            first_seq=ch.first_seq if depth else ch.last_seq + 1,
            last_seq=ch.last_seq,
            oldest_publish_time=oldest,
            groups=groups,
            dropped=ch.dropped,
        )

    def purge(self, channel: str) -> int:
        ch = self._get(channel)
        if ch is None:
            return 0
        self.flush_rows()
        conn = self.conn
        n = ch.depth()
        conn.execute("DELETE FROM messages WHERE channel_id = ?", (ch.id,))
        ch.first_seq = ch.last_seq + 1
        ch.nbytes = 0
        self._uncache(ch, ch.first_seq)
        for g in ch.groups.values():
            conn.execute("DELETE FROM pending WHERE grp = ?", (g.id,))
            conn.execute("DELETE FROM pending_ranges WHERE grp = ?", (g.id,))
            g.cursor = max(g.cursor, ch.last_seq)
            conn.execute("UPDATE groups SET cursor = ? WHERE id = ?", (g.cursor, g.id))
        self._save(ch)
        self._maybe_vacuum()
        return n

    def delete(self, channel: str) -> bool:
        ch = self._get(channel)
        if ch is None:
            return False
        self.flush_rows()
        conn = self.conn
        for table in ("pending", "pending_ranges"):
            conn.execute(
                f"DELETE FROM {table} WHERE grp IN (SELECT id FROM groups WHERE channel_id = ?)", (ch.id,)
            )
        for table in ("messages", "groups", "dedupe"):
            conn.execute(f"DELETE FROM {table} WHERE channel_id = ?", (ch.id,))
        conn.execute("DELETE FROM channels WHERE id = ?", (ch.id,))
        self._forget_channel(channel, ch)
        self._maybe_vacuum()
        return True
