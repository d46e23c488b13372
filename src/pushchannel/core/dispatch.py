"""Dispatch: moving stored messages to subscriptions with credit.

A :class:`Pump` runs a task only while it has work: it is kicked by a publish, an ack, a nack
or a timer at the next deadline, pumps until nothing moves, then ends. An idle channel costs
no task and no wake-up.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from pushchannel.core.model import DEAD_LETTER_SUFFIX, StartSpec, Stored
from pushchannel.core.subscription import Subscription

if TYPE_CHECKING:
    from pushchannel.core.broker import Broker, ChannelHub

_log_name = "pushchannel.dispatch"


_RECHECK = 0.02  # seconds


def _by_seq(m: Stored) -> int:
    return m.seq


class Pump:
    """Runs ``pump_once`` while it makes progress or is kicked again: in a task of its own
    (:meth:`kick`), or in the caller's task (:meth:`run_here`). One runner at a time: a kick
    while one runs marks it dirty, and it goes round again."""

    def __init__(self) -> None:
        self._busy = False  # a runner is in _run
        self._task: asyncio.Task[None] | None = None  # that runner, when it is a task of ours
        self._done: asyncio.Future[None] | None = None  # for stop(), while a caller runs it
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when the armed timer fires (unix s)
        self._dirty = False
        self._stopped = False

    def _claim(self) -> bool:
        """Whether the caller becomes the runner; a runner already under way is marked to go
        round again instead."""
        if self._stopped:
            return False
        if self._busy:
            self._dirty = True
            return False
        self._busy, self._dirty = True, False
        return True

    def kick(self) -> None:
        if self._claim():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_here(self) -> None:
        """What :meth:`kick` does, in the caller's task: no task to create and schedule. For
        callers that can wait for a round, such as a publish on a store whose calls never
        suspend (a round there is a few microseconds of CPU)."""
        if not self._claim():
            return
        try:
            await self._run()
        except asyncio.CancelledError:
            self.kick()  # the caller was cancelled: finish in a task of our own
            raise

    async def _run(self) -> None:
        try:
            while not self._stopped:
                self._dirty = False
                progressed = await self.pump_once()
                if self._dirty or (progressed and not self.idle()):
                    continue
                self._arm(self.next_wake())
                break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a store fault: retry later rather than die silently
            self.on_error(exc)
            self._arm(time.time() + 1.0)
        finally:
            self._busy = False
            self._task = None
            done, self._done = self._done, None
            if done is not None and not done.done():
                done.set_result(None)

    def _arm(self, wake_at: float | None) -> None:
        """Wake at ``wake_at``. A timer already set to fire no later stays: an early wake costs
        one idle round, while re-arming after every round (each pushes the lease deadline on)
        costs a timer per message."""
        if wake_at is not None and math.isfinite(wake_at) and not self._stopped:
            if self._timer is not None and self._timer_at <= wake_at:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = wake_at
            delay = max(0.0, wake_at - time.time())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self.kick()

    async def stop(self) -> None:
        """No more rounds; waits (up to 5 s) for one under way to finish its store call."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._busy:
            return
        task = self._task
        if task is None:  # a caller runs it: wait for its round, not for the caller
            if self._done is None:
                self._done = asyncio.get_running_loop().create_future()
            waited: asyncio.Future[None] = self._done
        elif task is asyncio.current_task():
            return
        else:
            waited = task
        await asyncio.wait({waited}, timeout=5.0)

    async def pump_once(self) -> bool:
        """One round; whether it moved anything."""
        raise NotImplementedError

    def idle(self) -> bool:
        """Whether another round now would find nothing to do (after one that made progress:
        if so, the runner ends without trying)."""
        return False

    def next_wake(self) -> float | None:
        return None

    def on_error(self, exc: Exception) -> None:
        pass


class GroupDispatcher(Pump):
    """One per (channel, durable group) with local subscriptions: claims what is due first,
    then reads new messages, for each subscription with credit in turn (round robin)."""

    def __init__(self, broker: Broker, hub: ChannelHub, group: str) -> None:
        super().__init__()
        self.broker = broker
        self.hub = hub
        self.channel = hub.channel
        self.group = group
        self.subs: list[Subscription] = []
        self._rr = 0
        self._exhausted_at = -1  # hub.last_seq when read_new last came back short
        self._next_due = 0.0  # earliest known deadline; 0: look in the store

    def note_deadline(self, deadline: float) -> None:
        if deadline < self._next_due:
            self._next_due = deadline

    def on_error(self, exc: Exception) -> None:
        self.broker.log_error("dispatch", self.channel, exc)

    def has_work(self, now: float) -> bool:
        """Whether a round could hand anything out: unread messages, or something due."""
        return self.hub.last_seq > self._exhausted_at or self._next_due <= now

    def idle(self) -> bool:
        return not self.has_work(time.time())

    async def pump_once(self) -> bool:
        if not self.has_work(time.time()):
            return False
        subs = [s for s in self.subs if not s.closed]
        if not subs:
            return False
        broker, store, cfg = self.broker, self.broker.store, self.broker.config
        channel, group = self.channel, self.group
        n = len(subs)
        start = self._rr % n
        self._rr = start + 1
        progressed = False
        for i in range(n):
            sub = subs[(start + i) % n]
            now = time.time()
            credit = min(sub.credit(now), cfg.max_dispatch_batch)
            if credit <= 0 or sub.closed:
                continue
            deadline = now + sub.ack_deadline
            batch: list[Stored] = []
            if self._next_due <= now:
                self._next_due = math.inf  # noted again below, or read back from the store
                claimed = await store.claim_expired(channel, group, sub.id, credit, now, deadline)
                if len(claimed) < credit:
                    nd = await store.next_deadline(channel, group)
                    self._next_due = min(self._next_due, nd if nd is not None else math.inf)
                else:
                    self._next_due = now  # more may be due
                if claimed:
                    claimed.sort(key=_by_seq)  # redeliveries that fell due together go in order
                    batch = await self._screen(claimed, now, redelivery=True)
            room = credit - len(batch)
            if room > 0 and self.hub.last_seq > self._exhausted_at:
                marker = self.hub.last_seq
                fresh = await store.read_new(channel, group, sub.id, room, deadline)
                if len(fresh) < room:
                    self._exhausted_at = marker
                if fresh:
                    for m in fresh:
                        if 0.0 < m.expires_at <= now:  # rare: screen the lot
                            fresh = await self._screen(fresh, now, redelivery=False)
                            break
                    batch = batch + fresh if batch else fresh
            if batch:
                progressed = True
                if sub.closed:  # it went away while we awaited the store
                    await store.nack(channel, group, [m.seq for m in batch], now, "consumer disconnected")
                    self._next_due = min(self._next_due, now)
                    continue
                sub.push(batch, deadline)
                self.note_deadline(deadline)
                broker.hooks.on_deliver(channel, group, batch, now)
        return progressed

    async def _screen(self, msgs: list[Stored], now: float, *, redelivery: bool) -> list[Stored]:
        """Drop what expired (ttl) and dead-letter what ran out of attempts."""
        broker = self.broker
        expired = [m.seq for m in msgs if m.expired(now)]
        dead: list[Stored] = []
        if redelivery:
            limit = broker.config.max_delivery_attempts
            dead = [m for m in msgs if m.attempt > limit and not m.expired(now)]
            broker.hooks.on_redeliver(self.channel, self.group, len(msgs))
        if not expired and not dead:
            return msgs
        store = broker.store
        if expired:
            await store.ack(self.channel, self.group, expired)
            broker.count_expired(self.channel, len(expired))
        if dead:
            if self.channel.endswith(DEAD_LETTER_SUFFIX):
                dead = []  # a dead-letter channel's messages are redelivered, never lost
            else:
                dl = self.channel + DEAD_LETTER_SUFFIX
                await store.dead_letter(self.channel, self.group, dead, now, broker.config.policy_for(dl))
                broker.hooks.on_dead_letter(self.channel, self.group, len(dead))
                broker.notify_appended(dl, await store.last_seq(dl))
        gone = set(expired) | {m.seq for m in dead}
        return [m for m in msgs if m.seq not in gone]

    def next_wake(self) -> float | None:
        now = time.time()
        wake = self._next_due
        sweep = self.broker.store.sweep_interval
        if sweep is not None and self.subs:
            wake = min(wake, now + sweep)
            self._next_due = wake
        if wake <= now:
            if any(not s.closed and s.credit(now) > 0 for s in self.subs):
                # It fell due while this round ran (its clock read came before the deadline):
                # claim it in a moment. The pause bounds any loop to a few rounds a second.
                return now + _RECHECK
            # Something is due but no consumer has credit: credit comes back with an ack (which
            # kicks us) or when a lease runs out, so wake then, not in a loop.
            wake = min((s.next_lapse for s in self.subs), default=math.inf)
        return wake if math.isfinite(wake) else None


class BroadcastFeeder:
    """A broadcast subscription's own cursor over the log (acks only free credit)."""

    __slots__ = ("cursor", "sub")

    def __init__(self, sub: Subscription, cursor: int) -> None:
        self.sub = sub
        self.cursor = cursor

    @staticmethod
    async def start_cursor(broker: Broker, channel: str, start: StartSpec) -> int:
        store = broker.store
        if start.kind in ("default", "new"):
            return await store.last_seq(channel)
        if start.kind == "earliest":
            return 0
        if start.kind == "seq":
            return max(0, int(start.value) - 1)
        cursor = 0
        while True:  # by time: walk the log in pages
            page = await store.read_range(channel, cursor, 1000)
            if not page:
                return cursor
            for m in page:
                if m.publish_time >= start.value:
                    return m.seq - 1
            cursor = page[-1].seq


class BroadcastFan(Pump):
    """Feeds every broadcast subscription of one channel from one task. The feeders that
    stand at the same cursor (after a publish: all that kept up) share one read of the log
    and one list of messages, so a publish to N subscribers costs one store read and N
    hand-overs, not N tasks and N reads."""

    def __init__(self, broker: Broker, hub: ChannelHub) -> None:
        super().__init__()
        self.broker = broker
        self.hub = hub
        self._waiting: dict[BroadcastFeeder, None] = {}  # behind the log, possibly with credit

    def want(self, feeder: BroadcastFeeder) -> None:
        """This feeder may have something to read: a new subscription, or credit came back."""
        if feeder.cursor < self.hub.last_seq:
            self._waiting[feeder] = None
            self.kick()

    def published(self) -> None:
        """The log grew: every feeder is behind now."""
        self._waiting = dict.fromkeys(self.hub.feeders.values())
        self.kick()

    def idle(self) -> bool:
        return not self._waiting

    def forget(self, feeder: BroadcastFeeder) -> None:
        self._waiting.pop(feeder, None)

    def on_error(self, exc: Exception) -> None:
        self.broker.log_error("broadcast", self.hub.channel, exc)

    async def pump_once(self) -> bool:
        if not self._waiting:
            return False
        waiting, self._waiting = self._waiting, {}
        hub, broker = self.hub, self.broker
        last_seq = hub.last_seq
        now = time.time()
        cap = broker.config.max_dispatch_batch
        by_cursor: dict[int, list[tuple[BroadcastFeeder, int]]] = {}
        for f in waiting:
            if f.sub.closed or f.cursor >= last_seq:
                continue
            credit = min(f.sub.credit(now), cap)
            if credit > 0:  # without credit, the ack that frees some calls want() again
                by_cursor.setdefault(f.cursor, []).append((f, credit))
        progressed = False
        for cursor, group in by_cursor.items():
            limit = max(credit for _, credit in group)
            msgs = await broker.store.read_range(hub.channel, cursor, limit)
            if not msgs:  # trimmed meanwhile: nothing left to read up to last_seq
                for f, _ in group:
                    f.cursor = max(f.cursor, last_seq)
                continue
            progressed = True
            expired = {m.seq for m in msgs if m.expired(now)}
            for f, credit in group:
                if f.sub.closed or f.cursor != cursor:
                    continue
                part = msgs if credit >= len(msgs) else msgs[:credit]
                f.cursor = part[-1].seq
                if expired:
                    out = [m for m in part if m.seq not in expired]
                    if len(out) < len(part):
                        broker.count_expired(hub.channel, len(part) - len(out))
                else:
                    out = part  # one list for all who read the whole page: encoded once
                if out:
                    f.sub.push(out, math.inf)
                    broker.hooks.on_deliver(hub.channel, f.sub.group, out, now)
                if f.cursor < hub.last_seq:
                    self._waiting[f] = None
        return progressed
