"""The broker core: channels, groups, dispatch and retention over one Store. No gRPC here:
the servicers in ``pushchannel.server`` are thin adapters over :class:`Broker`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pushchannel.config import BrokerConfig
from pushchannel.core import validation
from pushchannel.core.dispatch import BroadcastFan, BroadcastFeeder, GroupDispatcher, Pump
from pushchannel.core.hooks import BrokerHooks, HookChain
from pushchannel.core.model import DEFAULT_GROUP, AppendResult, ChannelStats, NewMessage, Stored
from pushchannel.core.subscription import IdleClock, SubscribeParams, Subscription
from pushchannel.core.timeslice import TimeSlice
from pushchannel.errors import NotFound, PushChannelError, Unavailable
from pushchannel.store.base import Store

log = logging.getLogger("pushchannel.broker")

#: Every channel is trimmed at least this often, in equal shares at each retention tick (on the
#: memory store, whose trims never suspend, a sweep of 50,000 channels in one piece held every
#: stream and publish for 260 ms).
_SWEEP_PERIOD = 60.0  # seconds
_TRIMS_AT_ONCE = 32  # retention trims sent to a store with I/O together

_VALID_CHANNELS_CAP = 10_000


@dataclass(slots=True)
class BrokerStats(BrokerHooks):
    """Counters since start: the first of the broker's hooks (``Broker.hooks``)."""

    published: int = 0
    duplicates: int = 0
    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    expired: int = 0
    unknown_acks: int = 0
    expired_by_channel: dict[str, int] = field(default_factory=dict)

    def on_publish(self, channel: str, stored: int, duplicates: int, seconds: float) -> None:
        self.published += stored
        self.duplicates += duplicates

    def on_deliver(self, channel: str, group: str, messages: Sequence[Stored], now: float) -> None:
        self.delivered += len(messages)

    def on_ack(self, channel: str, group: str, n: int) -> None:
        self.acked += n

    def on_nack(self, channel: str, group: str, n: int) -> None:
        self.nacked += n

    def on_redeliver(self, channel: str, group: str, n: int) -> None:
        self.redelivered += n

    def on_dead_letter(self, channel: str, group: str, n: int) -> None:
        self.dead_lettered += n

    def on_expired(self, channel: str, n: int) -> None:
        self.expired += n
        self.expired_by_channel[channel] = self.expired_by_channel.get(channel, 0) + n


class ChannelHub:
    """The local subscriptions of one channel: its group dispatchers and broadcast feeders."""

    def __init__(self, broker: Broker, channel: str, last_seq: int) -> None:
        self.broker = broker
        self.channel = channel
        self.last_seq = last_seq
        self.dispatchers: dict[str, GroupDispatcher] = {}
        self.feeders: dict[str, BroadcastFeeder] = {}
        self._fan: BroadcastFan | None = None  # made at the first broadcast subscriber
        self.watcher: asyncio.Task[None] | None = None

    @property
    def fan(self) -> BroadcastFan:
        """The channel's broadcast fan. Most channels never have a broadcast subscriber, and an
        idle fan costs 0.2 KB, so it is made when first wanted."""
        fan = self._fan
        if fan is None:
            fan = self._fan = BroadcastFan(self.broker, self)
        return fan

    def notify(self, last_seq: int) -> None:
        """The log grew to ``last_seq``: wake whoever feeds from it."""
        for d in self.advance(last_seq):
            d.kick()

    def advance(self, last_seq: int) -> list[GroupDispatcher]:
        """Note that the log grew to ``last_seq`` and start the broadcast fan; the group
        dispatchers to run are the caller's to kick, or to run in its own task (a publish on a
        store whose calls never suspend). The fan always runs in its own task: a round there
        hands the message to every subscriber, which a publisher should not wait for."""
        if last_seq <= self.last_seq:
            return []
        self.last_seq = last_seq
        if self.feeders:
            self.fan.published()
        return list(self.dispatchers.values())

    def empty(self) -> bool:
        return not self.dispatchers and not self.feeders

    def broadcast_floor(self) -> int | None:
        """The lowest seq a live broadcast cursor still needs."""
        return min((f.cursor + 1 for f in self.feeders.values()), default=None)

    def subscriptions(self) -> list[Subscription]:
        subs = [s for d in self.dispatchers.values() for s in d.subs]
        return subs + [f.sub for f in self.feeders.values()]

    async def watch(self) -> None:
        """Shared stores: follow appends made by other broker nodes."""
        store = self.broker.store
        while True:
            try:
                self.notify(await store.wait(self.channel, self.last_seq, 30.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.broker.log_error("watch", self.channel, exc)
                await asyncio.sleep(1.0)


class Broker:
    """Publish, subscribe, ack: the semantics of SPEC §3 over a Store."""

    def __init__(
        self, store: Store, config: BrokerConfig | None = None, hooks: Sequence[BrokerHooks] = ()
    ) -> None:
        self.store = store
        self.config = config or BrokerConfig()
        self.stats = BrokerStats()
        #: Every event goes here: the counters first, then the given hooks (metrics, logs).
        self.hooks: BrokerHooks = HookChain(self.stats, *hooks)
        self.node_id = os.urandom(3).hex()
        self._ids = itertools.count(1)
        self._hubs: dict[str, ChannelHub] = {}
        self._touched: set[str] = set()
        self._valid_channels: set[str] = set()  # names that passed check_channel (capped)
        self._age_due: dict[str, float] = {}  # channel -> when its oldest message passes max_age
        self._retention_task: asyncio.Task[None] | None = None
        self._closing = False
        #: Every subscription's heartbeat wake-up, on one loop timer.
        self.idle_clock = IdleClock()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start()
        self._retention_task = asyncio.get_running_loop().create_task(self._retention_loop())

    async def close(self, reason: PushChannelError | None = None) -> None:
        """Stop every subscription (their streams end with ``reason``) and the store."""
        await self.drain(reason)
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        await self.store.close()

    async def drain(self, reason: PushChannelError | None = None) -> None:
        """Refuse new publishes and subscriptions and end every subscription with ``reason``;
        publishes already past the door finish, and the store stays open for them."""
        self._closing = True
        err = reason or Unavailable("the broker is shutting down: reconnect")
        for hub in list(self._hubs.values()):
            for sub in hub.subscriptions():
                sub.close(err)
        for hub in list(self._hubs.values()):
            for sub in hub.subscriptions():
                await self.close_subscription(sub)

    def log_error(self, where: str, channel: str, exc: BaseException) -> None:
        log.error(
            "%s failed on channel %s: %s",
            where,
            channel,
            exc,
            exc_info=exc,
            extra={"event": "error", "where": where, "channel": channel},
        )
        self.hooks.on_error(where, channel, exc)

    # -- publishing ------------------------------------------------------------------------------
    async def publish(self, channel: str, messages: Sequence[NewMessage]) -> list[AppendResult]:
        cfg = self.config
        if channel not in self._valid_channels:  # the name's rules, checked once per name
            validation.check_channel(channel, cfg.limits)
            if len(self._valid_channels) >= _VALID_CHANNELS_CAP:
                self._valid_channels.clear()
            self._valid_channels.add(channel)
        validation.check_messages(messages, cfg.limits)
        if self._closing:
            raise Unavailable("the broker is shutting down: publish to another node or retry")
        started = time.perf_counter()
        results = await self.store.append(channel, messages, time.time(), cfg.policy_for(channel))
        dups = top = 0
        for r in results:
            if r.duplicate:
                dups += 1
            elif r.seq > top:
                top = r.seq
        self.hooks.on_publish(channel, len(results) - dups, dups, time.perf_counter() - started)
        if top:
            self._touched.add(channel)
            hub = self._hubs.get(channel)
            if hub is not None:
                if self.store.immediate:
                    for d in hub.advance(top):
                        await d.run_here()
                else:
                    hub.notify(top)
                if hub.dispatchers:
                    # Let the streams this woke write (on a store with I/O: the rounds it kicked
                    # start their reads) before this publish is answered: the answer, grpc.aio's
                    # send of the response, would go first and hold every delivery back ~100 us.
                    await asyncio.sleep(0)
        return results

    def notify_appended(self, channel: str, last_seq: int) -> None:
        hub = self._hubs.get(channel)
        if hub is not None:
            hub.notify(last_seq)

    # -- subscribing -----------------------------------------------------------------------------
    async def subscribe(self, params: SubscribeParams, peer: str = "") -> Subscription:
        cfg = self.config
        validation.check_channel(params.channel, cfg.limits)
        validation.check_group(params.group, cfg.limits)
        validation.check_in_flight(params.max_in_flight, cfg.limits)
        validation.check_ack_deadline(params.ack_deadline, cfg.limits)
        validation.check_start(params.start)
        if self._closing:
            raise Unavailable("the broker is shutting down: reconnect to another node")
        store, channel, now = self.store, params.channel, time.time()
        sub_id = f"{self.node_id}-{next(self._ids)}"
        group = f"broadcast-{sub_id}" if params.broadcast else (params.group or DEFAULT_GROUP)
        sub = Subscription(sub_id, params, group, peer, now, self.idle_clock)
        # Every store call first; the hub and dispatcher bookkeeping below has no await, so
        # concurrent subscribes and closes on one channel cannot interleave within it.
        await store.ensure_channel(channel, cfg.policy_for(channel), now)
        cursor = 0
        if params.broadcast:
            cursor = await BroadcastFeeder.start_cursor(self, channel, params.start)
        else:
            await store.ensure_group(channel, group, params.start, now)
        last_seq = await store.last_seq(channel)
        hub = self._hubs.get(channel)
        if hub is None:
            hub = self._hubs[channel] = ChannelHub(self, channel, last_seq)
            if store.shared:
                hub.watcher = asyncio.get_running_loop().create_task(hub.watch())
        hub.last_seq = max(hub.last_seq, last_seq)
        if params.broadcast:
            feeder = hub.feeders[sub_id] = BroadcastFeeder(sub, cursor)
            hub.fan.want(feeder)
        else:
            dispatcher = hub.dispatchers.get(group)
            if dispatcher is None:
                dispatcher = hub.dispatchers[group] = GroupDispatcher(self, hub, group)
            dispatcher.subs.append(sub)
            dispatcher.kick()
        self.hooks.on_subscribe(sub)
        return sub

    async def close_subscription(self, sub: Subscription) -> None:
        """The stream ended: what it had not acked becomes redeliverable now."""
        sub.close()
        hub = self._hubs.get(sub.channel)
        if hub is None:
            return
        seqs = sub.drain()
        # Bookkeeping first, without awaits (see subscribe); the store calls after.
        stopping: list[Pump] = []
        dispatcher: GroupDispatcher | None = None
        removed = False  # the servicer and drain() may both close one subscription
        if sub.broadcast:
            feeder = hub.feeders.pop(sub.id, None)
            if feeder is not None:
                hub.fan.forget(feeder)
                removed = True
        else:
            dispatcher = hub.dispatchers.get(sub.group)
            if dispatcher is not None and sub in dispatcher.subs:
                dispatcher.subs.remove(sub)
                removed = True
                if not dispatcher.subs:
                    del hub.dispatchers[sub.group]
                    stopping.append(dispatcher)
            else:
                dispatcher = None
        if hub.empty() and self._hubs.get(sub.channel) is hub:
            del self._hubs[sub.channel]
            if hub._fan is not None:
                stopping.append(hub._fan)
            if hub.watcher is not None:
                hub.watcher.cancel()
        if removed:
            self.hooks.on_unsubscribe(sub)
        if dispatcher is not None and seqs:
            now = time.time()
            try:
                await self.store.nack(sub.channel, sub.group, seqs, now, "consumer disconnected")
            except Exception as exc:  # the deadline will bring them back instead
                self.log_error("release", sub.channel, exc)
            live = self._hubs.get(sub.channel)
            successor = live.dispatchers.get(sub.group) if live is not None else None
            if successor is not None:
                successor.note_deadline(now)
                successor.kick()
        for pump in stopping:
            await pump.stop()

    async def ack(self, sub: Subscription, tags: list[int]) -> int:
        seqs, unknown = sub.settle(tags)
        self.stats.unknown_acks += unknown
        n = 0
        if seqs and not sub.broadcast:
            n = await self.store.ack(sub.channel, sub.group, seqs)
            self._touched.add(sub.channel)
        self.hooks.on_ack(sub.channel, sub.group, len(seqs))
        self._kick(sub, credit_only=True)
        return n

    async def nack(self, sub: Subscription, tags: list[int], delay: float, reason: str) -> int:
        seqs, unknown = sub.settle(tags)
        self.stats.unknown_acks += unknown
        self.hooks.on_nack(sub.channel, sub.group, len(seqs))
        if not seqs or sub.broadcast:
            self._kick(sub)
            return 0
        visible_at = time.time() + max(0.0, delay)
        why = f"nack: {reason}" if reason else "nack"
        n = await self.store.nack(sub.channel, sub.group, seqs, visible_at, why)
        dispatcher = self._dispatcher(sub)
        if dispatcher is not None:
            dispatcher.note_deadline(visible_at)
        self._kick(sub)
        return n

    async def modify_deadline(self, sub: Subscription, tags: list[int], seconds: float) -> int:
        """Move the deadline of deliveries; 0 gives them back at once (as Cloud Pub/Sub does)."""
        if seconds == 0:
            return await self.nack(sub, tags, 0.0, "deadline set to 0")
        validation.check_ack_deadline(seconds, self.config.limits)
        deadline = time.time() + seconds
        seqs = sub.extend(tags, deadline)
        if not seqs or sub.broadcast:
            return 0
        n = await self.store.extend(sub.channel, sub.group, seqs, deadline)
        dispatcher = self._dispatcher(sub)
        if dispatcher is not None:
            dispatcher.note_deadline(deadline)
            dispatcher.kick()  # re-arms its timer for a shorter deadline
        return n

    def _dispatcher(self, sub: Subscription) -> GroupDispatcher | None:
        hub = self._hubs.get(sub.channel)
        return hub.dispatchers.get(sub.group) if hub is not None else None

    async def written(self, sub: Subscription, msgs: Sequence[Stored]) -> None:
        """The servicer wrote these to the stream: acked now when the subscription auto-acks."""
        if sub.auto_ack and msgs:
            await self.ack(sub, [m.seq for m in msgs])

    def _kick(self, sub: Subscription, *, credit_only: bool = False) -> None:
        """Wake the pump that feeds ``sub``. ``credit_only``: all that changed is that it has
        credit again, which matters only if there is something to hand out."""
        hub = self._hubs.get(sub.channel)
        if hub is None:
            return
        if sub.broadcast:
            feeder = hub.feeders.get(sub.id)
            if feeder is not None:
                hub.fan.want(feeder)
            return
        dispatcher = hub.dispatchers.get(sub.group)
        if dispatcher is not None and (not credit_only or dispatcher.has_work(time.time())):
            dispatcher.kick()

    def count_expired(self, channel: str, n: int) -> None:
        self.hooks.on_expired(channel, n)

    # -- admin -----------------------------------------------------------------------------------
    async def channel_stats(self, channel: str) -> tuple[ChannelStats, list[Subscription]]:
        validation.check_channel(channel, self.config.limits)
        stats = await self.store.stats(channel)
        if stats is None:
            raise NotFound(f"channel '{channel}' does not exist")
        stats.expired = self.stats.expired_by_channel.get(channel, 0)
        hub = self._hubs.get(channel)
        return stats, hub.subscriptions() if hub is not None else []

    async def list_channels(self, prefix: str = "") -> list[str]:
        return [c for c in await self.store.channels() if c.startswith(prefix)]

    async def purge(self, channel: str) -> int:
        validation.check_channel(channel, self.config.limits)
        n = await self.store.purge(channel)
        hub = self._hubs.get(channel)
        if hub is not None:
            for d in hub.dispatchers.values():
                d.note_deadline(0.0)
        return n

    async def delete_channel(self, channel: str) -> bool:
        validation.check_channel(channel, self.config.limits)
        hub = self._hubs.get(channel)
        if hub is not None:
            for sub in hub.subscriptions():
                sub.close(NotFound(f"channel '{channel}' was deleted"))
        return await self.store.delete(channel)

    async def delete_group(self, channel: str, group: str) -> bool:
        validation.check_channel(channel, self.config.limits)
        hub = self._hubs.get(channel)
        if hub is not None and group in hub.dispatchers:
            for sub in hub.dispatchers[group].subs:
                sub.close(NotFound(f"group '{group}' of channel '{channel}' was deleted"))
        return await self.store.delete_group(channel, group)

    # -- retention -------------------------------------------------------------------------------
    async def trim(self, channel: str) -> None:
        hub = self._hubs.get(channel)
        keep_from = hub.broadcast_floor() if hub is not None else None
        policy = self.config.policy_for(channel)
        report = await self.store.trim(channel, policy, time.time(), keep_from)
        if report.expired:
            self.count_expired(channel, report.expired)
        if report.oldest:  # come back when the oldest message passes max_age, even if all is quiet
            self._age_due[channel] = report.oldest + policy.max_age
        else:
            self._age_due.pop(channel, None)

    async def _retention_loop(self) -> None:
        """Every tick: trim the channels touched since the last one, those whose oldest message
        has just aged out, and a share of all channels, so that every channel is trimmed at least
        once a minute (age limits apply to quiet channels too) without a stall once a minute."""
        interval = self.config.retention_interval
        ticks_per_sweep = max(1, int(_SWEEP_PERIOD / interval))
        sweep: list[str] = []  # the channels of this minute's sweep not trimmed yet
        share = 0
        for tick in itertools.count(0):
            await asyncio.sleep(interval)
            if tick % ticks_per_sweep == 0:  # a new minute (the last one's sweep is done)
                try:
                    sweep = await self.store.channels()
                except Exception as exc:
                    self.log_error("retention", "*", exc)
                share = -(-len(sweep) // ticks_per_sweep)
            if share:
                self._touched.update(sweep[-share:])
                del sweep[-share:]
            now = time.time()
            self._touched.update(c for c, due in self._age_due.items() if due <= now)
            touched, self._touched = self._touched, set()
            pause = TimeSlice()  # lets every stream and publish run in between
            if self.store.immediate:
                for channel in touched:
                    await self._trim_logged(channel)
                    await pause.tick()
                continue
            # A store with I/O answers from its own thread or server: trims sent together take
            # one round trip (and, on SQLite, one transaction) where one at a time took one each.
            pending = list(touched)
            for i in range(0, len(pending), _TRIMS_AT_ONCE):
                await asyncio.gather(*(self._trim_logged(c) for c in pending[i : i + _TRIMS_AT_ONCE]))
                await pause.tick()

    async def _trim_logged(self, channel: str) -> None:
        try:
            await self.trim(channel)
        except Exception as exc:
            self.log_error("retention", channel, exc)
