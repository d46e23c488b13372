"""The SQLite store's group operations: cursors and pending lists (Redis' XREADGROUP, XAUTOCLAIM,
XACK, XCLAIM ... IDLE, XPENDING)."""

from __future__ import annotations

from collections.abc import Sequence

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
        rows = conn.execute(
            f"SELECT {COLS} FROM messages WHERE channel_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (ch.id, g.cursor, limit),
        ).fetchall()
        if not rows:
            return []
        gid = g.id
        g.cursor = rows[-1][0]
        conn.execute("UPDATE groups SET cursor = ? WHERE id = ?", (g.cursor, gid))
        conn.execute(
            "INSERT OR REPLACE INTO pending SELECT ?, value, ?, ?, 1, '' FROM json_each(?)",
            (gid, consumer, deadline, seq_set(r[0] for r in rows)),
        )
        return [stored(r) for r in rows]

    def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        found = self._group(channel, group)
        if found is None or limit <= 0:
            return []
        ch, g = found
        conn = self.conn
        gid = g.id
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
        value: float | None = self.conn.execute(
            "SELECT min(deadline) FROM pending WHERE grp = ?", (found[1].id,)
        ).fetchone()[0]
        return value

    def _change(self, sql: str, params: tuple[object, ...], seqs: Sequence[int]) -> int:
        """Run ``sql`` with ``params`` and then ``seqs``, bound as the set ``_SEQS``: the number
        of pending entries changed (each seq counts once)."""
        if not seqs:
            return 0
        sql = sql.replace("_SEQS", "(SELECT value FROM json_each(?))")
        return self.conn.execute(sql, (*params, seq_set(seqs))).rowcount

    def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        found = self._group(channel, group)
        if found is None:
            return 0
        return self._change("DELETE FROM pending WHERE grp = ? AND seq IN _SEQS", (found[1].id,), seqs)

    def nack(self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str) -> int:
        found = self._group(channel, group)
        if found is None:
            return 0
        return self._change(
            "UPDATE pending SET deadline = ?, reason = ? WHERE grp = ? AND seq IN _SEQS",
            (visible_at, reason, found[1].id),
            seqs,
        )

    def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        found = self._group(channel, group)
        if found is None:
            return 0
        return self._change(
            "UPDATE pending SET deadline = ? WHERE grp = ? AND seq IN _SEQS", (deadline, found[1].id), seqs
        )

    def pending(self, channel: str, group: str, limit: int) -> list[PendingEntry]:
        found = self._group(channel, group)
        if found is None or limit <= 0:
            return []
        rows = self.conn.execute(
            "SELECT seq, consumer, deadline, attempt, reason FROM pending WHERE grp = ? ORDER BY seq LIMIT ?",
            (found[1].id, limit),
        ).fetchall()
        return [PendingEntry(*r) for r in rows]

    def groups(self, channel: str) -> list[str]:
        ch = self._get(channel)
        return [] if ch is None else sorted(ch.groups)

    def delete_group(self, channel: str, group: str) -> bool:
        ch = self._get(channel)
        g = None if ch is None else ch.groups.pop(group, None)
        if g is None:
            return False
        self.conn.execute("DELETE FROM pending WHERE grp = ?", (g.id,))
        self.conn.execute("DELETE FROM groups WHERE id = ?", (g.id,))
        return True
