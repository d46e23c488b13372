"""``memory://``: the in-process store. Fastest, first-class for tests and speed, lost on exit."""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pushchannel.core.model import (
    DEFAULT_GROUP,
    AppendResult,
    ChannelPolicy,
    ChannelStats,
    GroupStats,
    NewMessage,
    PendingEntry,
    StartSpec,
    Stored,
    TrimReport,
)
from pushchannel.errors import ResourceExhausted
from pushchannel.store.base import Store, start_cursor

_EXPIRED_REASON = "ack deadline exceeded"


def _size(m: Stored) -> int:
    """Bytes a message counts against max_bytes: payload and UTF-8 attributes."""
    if not m.attributes:
        return len(m.payload)
    return len(m.payload) + sum(len(k.encode()) + len(v.encode()) for k, v in m.attributes.items())


@dataclass(slots=True)
class _Group:
    cursor: int
    # Insertion order is seq order: read_new adds ascending seqs, claims update in place.
    pending: dict[int, PendingEntry] = field(default_factory=dict)
    # (deadline, lo, hi): the entries lo..hi were given this deadline. Lazy: an item is stale
    # for a seq whose entry is gone or has another deadline now. One item per batch.
    heap: list[tuple[float, int, int]] = field(default_factory=list)

    def floor(self) -> int:
        """The lowest seq this group still needs."""
        for seq in self.pending:
            return min(seq, self.cursor + 1)
        return self.cursor + 1

    def set_deadline(self, entry: PendingEntry, deadline: float) -> None:
        entry.deadline = deadline
        heapq.heappush(self.heap, (deadline, entry.seq, entry.seq))

    def _live(self, deadline: float, lo: int, hi: int) -> list[PendingEntry]:
        pending = self.pending
        out = []
        for seq in range(lo, hi + 1):
            entry = pending.get(seq)
            if entry is not None and entry.deadline == deadline:
                out.append(entry)
        return out

    def due(self, now: float) -> list[PendingEntry]:
        """Pop the entries due at ``now`` in deadline order, dropping stale heap items."""
        out: list[PendingEntry] = []
        seen: set[int] = set()
        heap = self.heap
        while heap and heap[0][0] <= now:
            for entry in self._live(*heapq.heappop(heap)):
                if entry.seq not in seen:
                    seen.add(entry.seq)
                    out.append(entry)
        return out

    def next_deadline(self) -> float | None:
        heap = self.heap
        while heap:
            if self._live(*heap[0]):
                return heap[0][0]
            heapq.heappop(heap)
        return None


#: What a dropped message's slot holds until the list is compacted (never read: slots below
#: ``head`` are out of every range).
_GONE = Stored(0, "", b"", {}, 0.0)


@dataclass(slots=True)
class _Channel:
    msgs: list[Stored] = field(default_factory=list)
    base: int = 1  # seq of msgs[0]
    head: int = 0  # index of the first live message
    last_seq: int = 0
    nbytes: int = 0
    groups: dict[str, _Group] = field(default_factory=dict)
    # The ids seen within the dedupe window: id -> its seq. Each id is in it at most once, and
    # ``dedupe_ids[i]`` was first seen at ``dedupe_times[i]`` (two deques of bare references,
    # 16 B an id, where (time, id) tuples cost 72 B more: about 200 B an id in all, not 300).
    dedupe: dict[str, int] = field(default_factory=dict)
    # Made at the first id and dropped once the window passed it by: an empty deque still holds
    # a 64-slot block (0.6 KB per channel, one channel per host in the usual layout).
    dedupe_ids: deque[str] | None = None
    dedupe_times: deque[float] | None = None
    dropped: int = 0

    @property
    def first_seq(self) -> int:
        return self.base + self.head

    def depth(self) -> int:
        return len(self.msgs) - self.head

    def get(self, seq: int) -> Stored | None:
        i = seq - self.base
        if self.head <= i < len(self.msgs):
            return self.msgs[i]
        return None

    def drop_front(self, n: int) -> None:
        """Drop the ``n`` oldest live messages, letting go of them at once: a channel that gets
        a message now and then holds none it has dropped. The list is compacted once dropped
        slots are half of it or more (each slot moves at most once per halving: O(1) a message);
        until then a dropped slot holds :data:`_GONE`."""
        msgs, start = self.msgs, self.head
        end = start + n
        for m in msgs[start:end]:
            self.nbytes -= _size(m)
        if end * 2 >= len(msgs):
            del msgs[:end]
            self.base += end
            self.head = 0
        else:
            msgs[start:end] = [_GONE] * n
            self.head = end

    def floor(self) -> int:
        return min((g.floor() for g in self.groups.values()), default=self.last_seq + 1)

    def remember_ids(self, fresh: Sequence[Stored], now: float) -> None:
        ids, times = self.dedupe_ids, self.dedupe_times
        if ids is None or times is None:
            ids, times = self.dedupe_ids, self.dedupe_times = deque(), deque()
        dedupe = self.dedupe
        for st in fresh:
            if st.id:  # not seen within the window (append checked): a new entry, not a move
                dedupe[st.id] = st.seq
                ids.append(st.id)
                times.append(now)

    def prune_dedupe(self, now: float, window: float) -> None:
        ids, times = self.dedupe_ids, self.dedupe_times
        if ids is None or times is None:
            return
        horizon = now - window
        dedupe = self.dedupe
        while times and times[0] <= horizon:
            times.popleft()
            dedupe.pop(ids.popleft(), None)
        if not times:  # every id's window has passed: so has every entry of dedupe
            self.dedupe_ids = self.dedupe_times = None
            self.dedupe = {}  # a dict keeps its grown table when emptied; a new one does not


class MemoryStore(Store):
    """Every structure is a plain dict or list; no call awaits, so each is atomic."""

    immediate = True

    def __init__(self) -> None:
        super().__init__()
        self._channels: dict[str, _Channel] = {}

    def _create(self, channel: str, policy: ChannelPolicy | None) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
            if policy is not None and policy.default_group:
                ch.groups[DEFAULT_GROUP] = _Group(cursor=0)
        return ch

    async def ensure_channel(self, channel: str, policy: ChannelPolicy, now: float) -> bool:
        new = channel not in self._channels
        self._create(channel, policy)
        return new

    async def append(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[AppendResult]:
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._create(channel, policy)
        window = policy.dedupe_window
        if ch.dedupe_times:
            ch.prune_dedupe(now, window)
        results: list[AppendResult] = []
        fresh: list[Stored] = []
        seen: dict[str, int] | None = None  # ids in this batch, made at the first id
        added = 0
        seq = ch.last_seq
        for m in messages:
            mid = m.id
            if mid:
                hit = ch.dedupe.get(mid)
                if hit is not None:
                    results.append(AppendResult(hit, True))
                    continue
                if seen is None:
                    seen = {}
                elif mid in seen:
                    results.append(AppendResult(seen[mid], True))
                    continue
                seen[mid] = seq + 1
            seq += 1
            results.append(AppendResult(seq, False))
            # by position: half the cost of keywords, once per message published
            stored = Stored(seq, mid, m.payload, m.attributes, now, now + m.ttl if m.ttl > 0 else 0.0)
            fresh.append(stored)
            added += _size(stored)
        if not fresh:
            return results
        if policy.discard == "reject":
            if self._over(ch, policy, len(fresh), added):
                self._trim_acked(ch, None)  # make room from what no group needs any more
            if self._over(ch, policy, len(fresh), added):
                raise ResourceExhausted(
                    f"channel '{channel}' is full (max_messages={policy.max_messages}, "
                    f"max_bytes={policy.max_bytes}, discard=reject): consume or purge it, or raise its limits"
                )
        ch.msgs.extend(fresh)
        ch.last_seq = seq
        ch.nbytes += added
        if window > 0 and seen is not None:
            ch.remember_ids(fresh, now)
        if policy.discard == "drop-oldest" and self._over(ch, policy, 0, 0):
            ch.dropped += self._enforce_size(ch, policy)
        if self._waiters:
            self._wake(channel)
        return results

    @staticmethod
    def _over(ch: _Channel, policy: ChannelPolicy, n: int, nbytes: int) -> bool:
        return ch.depth() + n > policy.max_messages or ch.nbytes + nbytes > policy.max_bytes

    @staticmethod
    def _enforce_size(ch: _Channel, policy: ChannelPolicy) -> int:
        n = 0
        over_count = ch.depth() - policy.max_messages
        if over_count > 0:
            ch.drop_front(over_count)
            n += over_count
        while ch.nbytes > policy.max_bytes and ch.depth() > 0:
            ch.drop_front(1)
            n += 1
        return n

    @staticmethod
    def _trim_acked(ch: _Channel, keep_from: int | None) -> int:
        floor = ch.floor()
        if keep_from is not None:
            floor = min(floor, keep_from)
        n = max(0, min(floor, ch.last_seq + 1) - ch.first_seq)
        if n:
            ch.drop_front(n)
        return n

    async def read_range(self, channel: str, after_seq: int, limit: int) -> list[Stored]:
        ch = self._channels.get(channel)
        if ch is None or limit <= 0:
            return []
        start = max(after_seq + 1 - ch.base, ch.head)
        return ch.msgs[start : start + limit]

    async def last_seq(self, channel: str) -> int:
        ch = self._channels.get(channel)
        return 0 if ch is None else ch.last_seq

    async def ensure_group(self, channel: str, group: str, start: StartSpec, now: float) -> bool:
        ch = self._create(channel, None)
        if group in ch.groups:
            return False

        def first_at(t: float) -> int:
            live = ch.msgs[ch.head :]
            i = bisect.bisect_left(live, t, key=lambda m: m.publish_time)
            return live[i].seq if i < len(live) else ch.last_seq + 1

        cursor = start_cursor(start, group, ch.first_seq, ch.last_seq, first_at)
        ch.groups[group] = _Group(cursor=cursor)
        return True

    async def read_new(
        self, channel: str, group: str, consumer: str, limit: int, deadline: float
    ) -> list[Stored]:
        ch = self._channels.get(channel)
        g = ch.groups.get(group) if ch is not None else None
        if ch is None or g is None or limit <= 0:
            return []
        start = max(g.cursor + 1 - ch.base, ch.head)
        out = ch.msgs[start : start + limit]
        if not out:
            return out
        g.cursor = out[-1].seq
        pending = g.pending
        for m in out:
            pending[m.seq] = PendingEntry(m.seq, consumer, deadline, 1)
        # One heap item covers the whole batch: they share the deadline; `due` expands it.
        heapq.heappush(g.heap, (deadline, out[0].seq, out[-1].seq))
        return out

    async def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        ch = self._channels.get(channel)
        g = ch.groups.get(group) if ch is not None else None
        if ch is None or g is None or limit <= 0:
            return []
        out: list[Stored] = []
        due = g.due(now)
        for i, entry in enumerate(due):
            if len(out) >= limit:
                for rest in due[i:]:  # not taken this time: keep them due
                    heapq.heappush(g.heap, (rest.deadline, rest.seq, rest.seq))
                break
            m = ch.get(entry.seq)
            if m is None:
                del g.pending[entry.seq]
                continue
            reason = entry.reason or _EXPIRED_REASON
            entry.attempt += 1
            entry.consumer = consumer
            entry.reason = ""
            g.set_deadline(entry, deadline)
            out.append(replace(m, attempt=entry.attempt, reason=reason))
        return out

    async def next_deadline(self, channel: str, group: str) -> float | None:
        ch = self._channels.get(channel)
        g = ch.groups.get(group) if ch is not None else None
        return None if g is None else g.next_deadline()

    def _group(self, channel: str, group: str) -> _Group | None:
        ch = self._channels.get(channel)
        return ch.groups.get(group) if ch is not None else None

    async def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        g = self._group(channel, group)
        if g is None:
            return 0
        pending = g.pending
        n = 0
        for seq in set(seqs):
            if pending.pop(seq, None) is not None:
                n += 1
        return n

    async def nack(
        self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str
    ) -> int:
        g = self._group(channel, group)
        if g is None:
            return 0
        n = 0
        for seq in set(seqs):
            entry = g.pending.get(seq)
            if entry is not None:
                entry.reason = reason
                g.set_deadline(entry, visible_at)
                n += 1
        return n

    async def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        g = self._group(channel, group)
        if g is None:
            return 0
        n = 0
        for seq in set(seqs):
            entry = g.pending.get(seq)
            if entry is not None:
                g.set_deadline(entry, deadline)
                n += 1
        return n

    async def pending(self, channel: str, group: str, limit: int = 1000) -> list[PendingEntry]:
        g = self._group(channel, group)
        if g is None:
            return []
        entries = sorted(g.pending.values(), key=lambda e: e.seq)[:limit]
        return [replace(e) for e in entries]

    async def groups(self, channel: str) -> list[str]:
        ch = self._channels.get(channel)
        return [] if ch is None else sorted(ch.groups)

    async def delete_group(self, channel: str, group: str) -> bool:
        ch = self._channels.get(channel)
        return ch is not None and ch.groups.pop(group, None) is not None

    async def trim(
        self, channel: str, policy: ChannelPolicy, now: float, keep_from: int | None = None
    ) -> TrimReport:
        report = TrimReport()
        ch = self._channels.get(channel)
        if ch is None:
            return report
        report.acked = self._trim_acked(ch, keep_from)
        horizon = now - policy.max_age
        while ch.depth() and ch.msgs[ch.head].publish_time < horizon:
            ch.drop_front(1)
            report.aged += 1
        while ch.depth() and ch.msgs[ch.head].expired(now):
            ch.drop_front(1)
            report.expired += 1
        report.dropped = self._enforce_size(ch, policy)
        ch.dropped += report.aged + report.dropped
        ch.prune_dedupe(now, policy.dedupe_window)
        if ch.depth():
            report.oldest = ch.msgs[ch.head].publish_time
        return report

    async def channels(self) -> list[str]:
        return sorted(self._channels)

    async def stats(self, channel: str) -> ChannelStats | None:
        ch = self._channels.get(channel)
        if ch is None:
            return None
        groups = [
            GroupStats(name, g.cursor, max(0, ch.last_seq - g.cursor), len(g.pending))
            for name, g in sorted(ch.groups.items())
        ]
        return ChannelStats(
            name=channel,
            depth=ch.depth(),
            bytes=ch.nbytes,
            first_seq=ch.first_seq if ch.depth() else ch.last_seq + 1,
            last_seq=ch.last_seq,
            oldest_publish_time=ch.msgs[ch.head].publish_time if ch.depth() else 0.0,
            groups=groups,
            dropped=ch.dropped,
        )

    async def purge(self, channel: str) -> int:
        ch = self._channels.get(channel)
        if ch is None:
            return 0
        n = ch.depth()
        ch.drop_front(n)
        for g in ch.groups.values():
            g.pending.clear()
            g.heap.clear()
            g.cursor = max(g.cursor, ch.last_seq)
        return n

    async def delete(self, channel: str) -> bool:
        return self._channels.pop(channel, None) is not None
