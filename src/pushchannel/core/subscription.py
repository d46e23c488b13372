"""A Subscription: one consumer's credit, its in-flight deliveries and its outbox."""

from __future__ import annotations

import asyncio
import heapq
import math
from dataclasses import dataclass, field

from pushchannel.core.model import StartSpec, Stored
from pushchannel.errors import PushChannelError

_LAPSED_CAP_FACTOR = 10
_TIMER_SLACK = 0.002  # s: event loops may fire a timer up to a tick early


class IdleClock:
    """The heartbeat waits of every subscription, on one event-loop timer.

    A subscription waiting for its next batch must wake up after ``timeout`` s to send a
    heartbeat. A loop timer of its own costs about 0.6 KB per idle host stream (uvloop's handle,
    its libuv timer, the callback's context); here a waiting subscription costs an entry in the
    bucket of its tick. Wake-ups are rounded up to the next ``resolution`` tick: a heartbeat comes
    up to ``resolution`` s late, never early.
    """

    __slots__ = ("_buckets", "_handle", "_handle_tick", "_ticks", "resolution")

    def __init__(self, resolution: float = 0.05) -> None:
        self.resolution = resolution
        self._buckets: dict[int, dict[Subscription, None]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks (may hold ticks already gone)
        self._handle: asyncio.TimerHandle | None = None
        self._handle_tick = 0

    def tick(self, at: float) -> int:
        """The tick a wake-up due at loop time ``at`` is served in (at or after ``at``)."""
        return math.ceil(at / self.resolution)

    def add(self, sub: Subscription, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = {sub: None}
            heapq.heappush(self._ticks, tick)
            if self._handle is None or tick < self._handle_tick:
                self._schedule(tick)
        else:
            bucket[sub] = None

    def discard(self, sub: Subscription, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(sub, None)
            if not bucket:
                del self._buckets[tick]

    def waiting(self) -> int:
        """Subscriptions with a wake-up set (for tests and stats)."""
        return sum(len(b) for b in self._buckets.values())

    def _schedule(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_at(tick * self.resolution, self._fire)
        self._handle_tick = tick

    def _fire(self) -> None:
        self._handle = None
        now_tick = math.floor((asyncio.get_running_loop().time() + _TIMER_SLACK) / self.resolution)
        ticks, buckets = self._ticks, self._buckets
        due: list[Subscription] = []
        while ticks and ticks[0] <= now_tick:
            bucket = buckets.pop(heapq.heappop(ticks), None)
            if bucket:
                due.extend(bucket)
        while ticks and ticks[0] not in buckets:  # emptied by discard
            heapq.heappop(ticks)
        if ticks:
            self._schedule(ticks[0])
        for sub in due:
            sub._idle_tick = 0
            sub._idle_check()


@dataclass(frozen=True, slots=True)
class SubscribeParams:
    channel: str
    group: str = "default"
    broadcast: bool = False
    start: StartSpec = field(default_factory=StartSpec)
    max_in_flight: int = 100
    ack_deadline: float = 30.0
    auto_ack: bool = False


class Subscription:
    """Credit is ``max_in_flight`` minus the deliveries whose lease has not run out; the
    outbox holds batches the servicer has not written yet. Delivery tags are seqs."""

    __slots__ = (
        "_clock",
        "_earliest",
        "_idle_at",
        "_idle_tick",
        "_lapsed",
        "_outbox",
        "_waiter",
        "ack_deadline",
        "auto_ack",
        "broadcast",
        "channel",
        "closed",
        "error",
        "group",
        "id",
        "in_flight",
        "max_in_flight",
        "peer",
        "since",
    )

    def __init__(
        self, sub_id: str, params: SubscribeParams, group: str, peer: str, since: float, clock: IdleClock
    ) -> None:
        self.id = sub_id
        self.channel = params.channel
        self.group = group
        self.broadcast = params.broadcast
        self.max_in_flight = params.max_in_flight
        self.ack_deadline = params.ack_deadline
        self.auto_ack = params.auto_ack
        self.peer = peer
        self.since = since
        self.in_flight: dict[int, float] = {}  # seq -> lease deadline (unix s)
        self._lapsed: dict[int, None] = {}  # leases that ran out: still ack-able, no credit
        self._earliest = math.inf
        # A list, not a deque: it holds a batch or two at a time, and an idle subscription's
        # empty list costs 56 bytes where a deque costs 760 (one per host stream).
        self._outbox: list[list[Stored]] = []
        self._waiter: asyncio.Future[None] | None = None
        # The heartbeat wake-up of next_batch, on the broker's shared clock: set once and moved
        # on lazily (see _idle_check).
        self._clock = clock
        self._idle_tick = 0  # the clock tick this subscription is woken in (0: none)
        self._idle_at = 0.0  # loop time at which the current wait times out
        self.closed = False
        self.error: PushChannelError | None = None

    # -- the dispatcher's side -------------------------------------------------------------------
    def credit(self, now: float) -> int:
        if now >= self._earliest:
            self._lapse(now)
        return self.max_in_flight - len(self.in_flight)

    def _lapse(self, now: float) -> None:
        earliest = math.inf
        lapsed = self._lapsed
        for seq, deadline in list(self.in_flight.items()):
            if deadline <= now:
                del self.in_flight[seq]
                lapsed[seq] = None
            elif deadline < earliest:
                earliest = deadline
        self._earliest = earliest
        excess = len(lapsed) - _LAPSED_CAP_FACTOR * self.max_in_flight
        for seq in list(lapsed)[: max(0, excess)]:
            del lapsed[seq]

    @property
    def next_lapse(self) -> float:
        """When the earliest lease runs out (inf: none)."""
        return self._earliest

    def push(self, batch: list[Stored], deadline: float) -> None:
        in_flight = self.in_flight
        for m in batch:
            in_flight[m.seq] = deadline
        if deadline < self._earliest:
            self._earliest = deadline
        self._outbox.append(batch)
        self._wake()

    def extend(self, seqs: list[int], deadline: float) -> list[int]:
        known = [s for s in seqs if s in self.in_flight]
        for s in known:
            self.in_flight[s] = deadline
        if known and deadline < self._earliest:
            self._earliest = deadline
        return known

    def settle(self, tags: list[int]) -> tuple[list[int], int]:
        """Forget acked (or nacked) tags: the seqs this subscription knew, and how many it did not."""
        known: list[int] = []
        in_flight, lapsed = self.in_flight, self._lapsed
        for tag in tags:
            if in_flight.pop(tag, None) is not None or (tag in lapsed and lapsed.pop(tag) is None):
                known.append(tag)
        return known, len(tags) - len(known)

    def drain(self) -> list[int]:
        """On close: every seq still out, to be released."""
        seqs = list(self.in_flight)
        self.in_flight.clear()
        self._outbox.clear()
        return seqs

    def close(self, error: PushChannelError | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.error = error
            self._wake()
        if self._idle_tick:
            self._clock.discard(self, self._idle_tick)
            self._idle_tick = 0

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_at(self, at: float) -> None:
        """Be woken (``_idle_check``) at loop time ``at``, unless already set for then or earlier."""
        clock = self._clock
        tick = clock.tick(at)
        if self._idle_tick == 0 or tick < self._idle_tick:
            if self._idle_tick:  # a shorter timeout than last time
                clock.discard(self, self._idle_tick)
            self._idle_tick = tick
            clock.add(self, tick)

    def _idle_check(self) -> None:
        """The wake-up came. A stream that got something meanwhile started a later wait: follow
        it there. One wake-up per subscription, moved at most once per interval, instead of one
        set and cancelled around every wait (one per message when busy)."""
        if self.closed:
            return
        if asyncio.get_running_loop().time() + _TIMER_SLACK < self._idle_at:
            self._wake_at(self._idle_at)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the servicer's side ---------------------------------------------------------------------
    async def next_batch(self, timeout: float) -> list[Stored] | None:
        """The next batch to write; ``None`` after ``timeout`` s with nothing to send (time for a
        heartbeat); ``[]`` once the subscription closed cleanly (the stream ends with OK).
        Raises the broker's reason when it closed the subscription with one."""
        if not self._outbox and not self.closed:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            self._wake_at(at := loop.time() + timeout)
            self._idle_at = at
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._outbox and not self.closed:
                return None
        outbox = self._outbox
        if outbox:
            batch, taken = outbox[0], 1
            while taken < len(outbox) and len(batch) < 1000:  # coalesce what piled up
                batch = batch + outbox[taken]
                taken += 1
            del outbox[:taken]
            return batch
        if self.error is not None:
            raise self.error
        return None if not self.closed else []
