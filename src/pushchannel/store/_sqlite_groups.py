"""The SQLite store's group operations: cursors and pending lists (Redis' XREADGROUP, XAUTOCLAIM,
XACK, XCLAIM ... IDLE, XPENDING).

A group's pending list is kept in two tables. What read_new hands out is ONE row of
``pending_ranges``: the seqs first_seq..last_seq, pending for one consumer until one deadline, at
attempt 1 and without a reason. Everything else is a row per seq in ``pending``; a seq is in one
table or the other, never both. An ack of whole ranges (the usual: a consumer acks what it got)
deletes their rows; any other change to part of a range (an ack of some of it, a nack, an
extension, a claim once it is due) first turns the range into rows of ``pending`` ("explodes"
it), so those operations keep working on single entries.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from pushchannel.core.model import PendingEntry, StartSpec, Stored
from pushchannel.store._sqlite_base import COLS, EXPIRED_REASON, TablesBase, seq_set, stored
from pushchannel.store.base import start_cursor

_M_COLS = ", ".join("m." + c for c in COLS.split(", "))


class GroupOps(TablesBase):
    """Operations on a channel's durable groups."""

    def ensure_group(self, channel: str, group: str, start: StartSpec) -> bool:
        ch = self._get(channel) or self._create(channel, False)
        if group in ch.groups:
            return False
        self.flush_rows()

        def first_at(t: float) -> int:
            # The first live message published at or after t (publish times ascend).
            lo, hi = ch.first_seq, ch.last_seq + 1
            while lo < hi:
                mid = (lo + hi) // 2
                (pt,) = self.conn.execute(
                    "SELECT publish_time FROM messages WHERE channel_id = ? AND seq = ?", (ch.id, mid)
                ).fetchone()
                if pt < t:
                    lo = mid + 1
                else:
                    hi = mid
            return lo

        cursor = start_cursor(start, group, ch.first_seq, ch.last_seq, first_at)
        self._add_group(ch, group, cursor)
        return True

    def read_new(self, channel: str, group: str, consumer: str, limit: int, deadline: float) -> list[Stored]:
        found = self._group(channel, group)
        if found is None or limit <= 0:
            return []
        ch, g = found
        conn = self.conn
        out = self._after(ch, g.cursor, limit)
        if not out:
            return []
        gid = g.id
        g.cursor = last = out[-1].seq
        conn.execute("UPDATE groups SET cursor = ? WHERE id = ?", (last, gid))
        # One row for them all: the log has no gaps, and no seq above the cursor was pending.
        conn.execute(
            "INSERT OR REPLACE INTO pending_ranges VALUES (?, ?, ?, ?, ?)",
            (gid, out[0].seq, last, consumer, deadline),
        )
        # What every group has read is not needed in the cache any more.
        self._uncache(ch, min(x.cursor for x in ch.groups.values()) + 1)
        return out

    def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        found = self._group(channel, group)
        if found is None or limit <= 0:
            return []
        ch, g = found
        self.flush_rows()
        conn = self.conn
        gid = g.id
        self._explode(
            gid,
            conn.execute(
                "SELECT first_seq, last_seq, consumer, deadline FROM pending_ranges"
                " WHERE grp = ? AND deadline <= ?",
                (gid, now),
            ).fetchall(),
        )
        first = ch.first_seq
        taken: list[tuple[int, int, str]] = []
        gone: list[int] = []
        # Due entries in (deadline, seq) order; those whose message is gone are dropped on the
        # way, until `limit` live ones are taken.
        after: tuple[float, int] = (float("-inf"), -1)
        while len(taken) < limit:
            rows = conn.execute(
                "SELECT deadline, seq, attempt, reason FROM pending WHERE grp = ? AND deadline <= ?"
                " AND (deadline, seq) > (?, ?) ORDER BY deadline, seq LIMIT ?",
                (gid, now, after[0], after[1], limit - len(taken)),
            ).fetchall()
            if not rows:
                break
            for _, seq, attempt, reason in rows:
                if seq < first:
                    gone.append(seq)
                else:
                    taken.append((seq, attempt + 1, reason or EXPIRED_REASON))
            after = (rows[-1][0], rows[-1][1])
        if gone:
            self._change("DELETE FROM pending WHERE grp = ? AND seq IN _SEQS", (gid,), gone)
        if not taken:
            return []
        conn.executemany(
            "UPDATE pending SET consumer = ?, deadline = ?, attempt = ?, reason = ''"
            " WHERE grp = ? AND seq = ?",
            [(consumer, deadline, attempt, gid, seq) for seq, attempt, _ in taken],
        )
        by_seq = {
            r[0]: r
            for r in conn.execute(
                f"SELECT {_M_COLS} FROM json_each(?) AS j"
                " CROSS JOIN messages AS m ON m.channel_id = ? AND m.seq = j.value",
                (seq_set(t[0] for t in taken), ch.id),
            )
        }
        out = []
        for seq, attempt, reason in taken:
            m = stored(by_seq[seq])
            m.attempt = attempt
            m.reason = reason
            out.append(m)
        return out

    def next_deadline(self, channel: str, group: str) -> float | None:
        found = self._group(channel, group)
        if found is None:
            return None
        gid = found[1].id
        value: float | None = self.conn.execute(
            "SELECT min(d) FROM (SELECT min(deadline) AS d FROM pending WHERE grp = ?"
            " UNION ALL SELECT min(deadline) FROM pending_ranges WHERE grp = ?)",
            (gid, gid),
        ).fetchone()[0]
        return value

    def _ranges(self, gid: int, lo: int, hi: int) -> list[tuple[int, int, str, float]]:
        """The group's ranges with a seq in lo..hi, in seq order. (Ranges do not overlap: only
        the last one to start at or before lo can reach into lo..hi from below.)"""
        rows: list[tuple[int, int, str, float]] = self.conn.execute(
            "SELECT first_seq, last_seq, consumer, deadline FROM pending_ranges"
            " WHERE grp = ?1 AND first_seq <= ?3 AND last_seq >= ?2 AND first_seq >= ifnull("
            "(SELECT max(first_seq) FROM pending_ranges WHERE grp = ?1 AND first_seq <= ?2), ?2)"
            " ORDER BY first_seq",
            (gid, lo, hi),
        ).fetchall()
        return rows

    def _explode(self, gid: int, ranges: Sequence[tuple[int, int, str, float]]) -> None:
        """Turn ranges into one row of ``pending`` per seq."""
        conn = self.conn
        for first, last, consumer, deadline in ranges:
            conn.execute(
                "INSERT OR REPLACE INTO pending SELECT ?, value, ?, ?, 1, '' FROM json_each(?)",
                (gid, consumer, deadline, seq_set(range(first, last + 1))),
            )
        self._drop_ranges(gid, ranges)

    def _drop_ranges(self, gid: int, ranges: Sequence[tuple[int, int, str, float]]) -> None:
        if ranges:
            self.conn.execute(
                "DELETE FROM pending_ranges WHERE grp = ? AND first_seq IN (SELECT value FROM json_each(?))",
                (gid, seq_set(r[0] for r in ranges)),
            )

    def _explode_around(self, gid: int, seqs: Sequence[int]) -> None:
        """Explode the ranges that hold any of ``seqs``."""
        if seqs:
            self._explode(gid, self._ranges(gid, min(seqs), max(seqs)))

    def _change(self, sql: str, params: tuple[object, ...], seqs: Sequence[int]) -> int:
        """Run ``sql`` with ``params`` and then ``seqs``, bound as the set ``_SEQS``: the number
        of pending entries changed (each seq counts once)."""
        if not seqs:
            return 0
        first, last = seqs[0], seqs[-1]
        if last - first + 1 == len(seqs) and tuple(seqs) == tuple(range(first, last + 1)):
            # The usual ack of a whole delivery: a range is cheaper than a set to look up.
            return self.conn.execute(
                sql.replace("IN _SEQS", "BETWEEN ? AND ?"), (*params, first, last)
            ).rowcount
        sql = sql.replace("_SEQS", "(SELECT value FROM json_each(?))")
        return self.conn.execute(sql, (*params, seq_set(seqs))).rowcount

    def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        found = self._group(channel, group)
        if found is None or not seqs:
            return 0
        gid = found[1].id
        first, last = seqs[0], seqs[-1]
        done = 0
        if last - first + 1 == len(seqs) and tuple(seqs) == tuple(range(first, last + 1)):
            # first..last: the ranges inside it go whole, one row each.
            ranges = self._ranges(gid, first, last)
            whole = [r for r in ranges if first <= r[0] and r[1] <= last]
            self._explode(gid, [r for r in ranges if not (first <= r[0] and r[1] <= last)])
            self._drop_ranges(gid, whole)
            done = sum(r[1] - r[0] + 1 for r in whole)
        else:
            self._explode_around(gid, seqs)
        return done + self._change("DELETE FROM pending WHERE grp = ? AND seq IN _SEQS", (gid,), seqs)

    def nack(self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str) -> int:
        found = self._group(channel, group)
        if found is None:
            return 0
        self._explode_around(found[1].id, seqs)
        return self._change(
            "UPDATE pending SET deadline = ?, reason = ? WHERE grp = ? AND seq IN _SEQS",
            (visible_at, reason, found[1].id),
            seqs,
        )

    def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        found = self._group(channel, group)
        if found is None:
            return 0
        self._explode_around(found[1].id, seqs)
        return self._change(
            "UPDATE pending SET deadline = ? WHERE grp = ? AND seq IN _SEQS", (deadline, found[1].id), seqs
        )

    def pending(self, channel: str, group: str, limit: int) -> list[PendingEntry]:
        found = self._group(channel, group)
        if found is None or limit <= 0:
            return []
        gid = found[1].id
        conn = self.conn
        rows = conn.execute(
            "SELECT seq, consumer, deadline, attempt, reason FROM pending WHERE grp = ? ORDER BY seq LIMIT ?",
            (gid, limit),
        ).fetchall()
        ranges = self._ranges(gid, 0, found[0].last_seq)
        if not ranges:
            return [PendingEntry(*r) for r in rows]

        def expanded() -> Iterator[tuple[int, str, float, int, str]]:
            for first, last, consumer, deadline in ranges:
                for seq in range(first, last + 1):
                    yield seq, consumer, deadline, 1, ""

        out = []
        for r in heapq.merge(rows, expanded()):
            out.append(PendingEntry(*r))
            if len(out) >= limit:
                break
        return out

    def groups(self, channel: str) -> list[str]:
        ch = self._get(channel)
        return [] if ch is None else sorted(ch.groups)

    def delete_group(self, channel: str, group: str) -> bool:
        ch = self._get(channel)
        g = None if ch is None else ch.groups.pop(group, None)
        if ch is None or g is None:
            return False
        self.conn.execute("DELETE FROM pending WHERE grp = ?", (g.id,))
        self.conn.execute("DELETE FROM pending_ranges WHERE grp = ?", (g.id,))
        self.conn.execute("DELETE FROM groups WHERE id = ?", (g.id,))
        if not ch.groups:
            self._uncache(ch, ch.last_seq + 1)
        return True
