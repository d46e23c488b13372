"""``redis://HOST:PORT/DB`` and ``redis+cluster://HOST:PORT``: the store several broker nodes share.

Redis Streams hold the channels (stream entry ``<seq>-0`` per message), their consumer groups
are the durable groups (last-delivered-id = cursor, PEL = pending list with consumer and
attempt), and a sorted set per group holds the deadlines the broker hands in (Redis' idle
times follow Redis' clock; ours are the broker's). Every call that touches several keys is one
Lua script (``_redis_lua``), so it is atomic; all keys of a channel carry the hash tag
``{channel}``, so they live in one slot of a cluster. docs/scaling.md says what is promised.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
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
from pushchannel.errors import ResourceExhausted, Unavailable
from pushchannel.store import _redis_lua as lua
from pushchannel.store._redis_support import (
    STORE_ERRORS,
    Keys,
    Notifier,
    RedisURL,
    client_options,
    close_client,
    display_url,
    parse_url,
    translate,
    unique,
)
from pushchannel.store.base import Store

__all__ = ["RedisStore"]

log = logging.getLogger("pushchannel.store.redis")

P = ParamSpec("P")
T = TypeVar("T")

EXPIRED_REASON = "ack deadline exceeded"
#: A consumer that holds nothing and was idle this long is forgotten by trim (ms).
_CONSUMER_IDLE_MS = 60_000
#: Re-register a channel in the registry set this often (seconds), so a registration lost to a
#: race with another node's delete comes back.
_REGISTER_EVERY = 60.0
_MIN_VERSION = (7, 0)
#: At most this many messages per read_new / claim_expired call ("up to limit"): the scripts
#: unpack them into one command, and Lua's stack holds about 8000 values.
_MAX_TAKE = 1000

_Entry = list[Any]  # [id, [field, value, ...]] as Redis returns a stream entry


def _translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn redis-py errors into pushchannel errors, once, at the store's boundary."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except STORE_ERRORS as exc:
            store = args[0]
            assert isinstance(store, RedisStore)
            raise translate(exc, store.url.address) from None

    return wrapper


def _repeatable(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Like :func:`_translated`, for calls that may safely run twice (reads, ack, nack, extend,
    ensure_*, trim): a broken connection (Redis restarted under a pooled connection) is tried
    once more on a fresh one. Appends, reads for a group, claims and dead-letter moves are
    never sent twice: one of them could have run before the connection broke."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            try:
                return await fn(*args, **kwargs)
            except RedisConnectionError:
                return await fn(*args, **kwargs)
        except STORE_ERRORS as exc:
            store = args[0]
            assert isinstance(store, RedisStore)
            raise translate(exc, store.url.address) from None

    return wrapper


def _f(x: float) -> str:
    """A float as Lua and Redis read it back exactly."""
    return repr(float(x))


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _stored(entry: _Entry) -> Stored:
    raw = entry[1]  # a flat list from scripts; redis-py's XRANGE makes it a dict
    fields = raw if isinstance(raw, dict) else {raw[i]: raw[i + 1] for i in range(0, len(raw), 2)}
    attrs = fields.get(b"a")
    expires = fields.get(b"x")
    return Stored(
        seq=_seq(entry[0]),
        id=fields[b"i"].decode() if b"i" in fields else "",
        payload=fields[b"p"],
        attributes=json.loads(attrs) if attrs else {},
        publish_time=float(fields[b"t"]),
        expires_at=float(expires) if expires else 0.0,
    )


def _attributes_size(attributes: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())


class RedisStore(Store):
    """A store on Redis 7 (standalone, or a Redis Cluster), shared by several broker nodes.

    URL: ``redis://[:PASSWORD@]HOST:PORT/DB`` (``rediss://`` for TLS), or
    ``redis+cluster://HOST:PORT`` (``rediss+cluster://``) for a cluster, where HOST:PORT is any
    node. Query options: ``prefix`` (of every key, default ``pc:``), ``sweep`` (seconds between
    looks for deliveries that expired on other nodes, default 1), and redis-py's own
    (``socket_timeout``, ...).
    """

    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url: RedisURL = parse_url(url)
        self.sweep_interval = self.url.sweep_interval
        self.prefix = self.url.prefix
        self._display = display_url(url)
        # redis-py's client (Redis or RedisCluster). Typed loosely on purpose: its annotations
        # differ between the versions the extra allows (redis>=5).
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._notifier: Notifier | None = None
        self._registry = f"{self.prefix}channels"
        self._registered: dict[str, float] = {}
        self._notify_name = f"{self.prefix}notify:{self.url.db}"

    def __repr__(self) -> str:
        return f"RedisStore({self._display!r})"

    @property
    def cluster(self) -> bool:
        return self.url.cluster

    # -- lifecycle ---------------------------------------------------------------------------
    @_translated
    async def start(self) -> None:
        """Connect, check that Redis is 7 or newer, load the scripts, subscribe to the notes
        of appends. Unavailable when Redis cannot be reached."""
        if self._client is not None:
            return
        options = client_options()
        client: Any
        if self.cluster:
            client = RedisCluster.from_url(self.url.client_url, **options)
        else:
            client = aioredis.Redis.from_url(self.url.client_url, **options)
        try:
            if self.cluster:
                await client.initialize()
            info = await client.info("server")
            if self.cluster and isinstance(info, dict) and "redis_version" not in info:
                info = next(iter(info.values()))  # one answer per node
            version = str(info.get("redis_version", "0"))
            if tuple(int(x) for x in version.split(".")[:2]) < _MIN_VERSION:
                raise Unavailable(
                    f"the {self.url.address} runs Redis {version}: pushchannel needs Redis 7 or newer"
                )
            await self._check_eviction(client)
            self._scripts = {name: client.register_script(src) for name, src in lua.ALL.items()}
            for name, script in self._scripts.items():
                if name != "dead_letter" or not self.cluster:
                    await client.script_load(script.script)
            notifier = Notifier(self._pubsub_client, self._notify_name, self.url.address)
            await notifier.start()
        except BaseException:
            await close_client(client)
            raise
        self._client = client
        self._notifier = notifier

    async def _check_eviction(self, client: Any) -> None:
        """Warn when Redis may evict keys: an evicted stream is a lost channel."""
        try:
            reply = await client.config_get("maxmemory-policy")
        except STORE_ERRORS:  # CONFIG is often disabled on managed Redis
            return
        if isinstance(reply, dict) and reply and "maxmemory-policy" not in reply:
            reply = next(iter(reply.values()))  # one answer per cluster node
        policy = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and policy != "noeviction":
            log.warning(
                "the %s has maxmemory-policy %s: it may evict channels when full; "
                "set maxmemory-policy noeviction (a full Redis then refuses publishes instead)",
                self.url.address,
                policy,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.close()
        if client is not None:
            await close_client(client)

    async def _pubsub_client(self, attempt: int) -> aioredis.Redis:
        """A plain connection for Pub/Sub: classic Pub/Sub reaches every node of a cluster, so
        any node will do (tried in turn after failures)."""
        options = client_options()
        options["socket_timeout"] = None  # it waits for notes as long as it takes
        if not self.cluster:
            return aioredis.Redis.from_url(self.url.client_url, **options)
        nodes: list[tuple[str, int]] = [(self.url.host, self.url.port)]
        client = self._client
        if client is not None:
            nodes += [(str(n.host), int(n.port)) for n in client.get_nodes()]
        host, port = nodes[attempt % len(nodes)]
        return aioredis.Redis.from_url(self.url.on_node(host, port), **options)

    def _redis(self) -> Any:
        client = self._client
        if client is None:
            raise Unavailable(f"the redis store {self._display} is not open (not started, or closed)")
        return client

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        self._redis()
        return await self._scripts[name](keys=list(keys), args=list(args))

    async def _register(self, channel: str) -> None:
        """Add the channel to the registry set (``channels``), before it is created."""
        now = time.monotonic()
        seen = self._registered.get(channel)
        if seen is not None and now - seen < _REGISTER_EVERY:
            return
        await self._redis().sadd(self._registry, channel)
        if len(self._registered) > 100_000:
            self._registered.clear()
        self._registered[channel] = now

    # -- the log -----------------------------------------------------------------------------
    @_repeatable
    async def ensure_channel(self, channel: str, policy: ChannelPolicy, now: float) -> bool:
        await self._register(channel)
        k = Keys(self.prefix, channel)
        created = await self._run(
            "ensure_channel", [k.m, k.s], [DEFAULT_GROUP if policy.default_group else ""]
        )
        return bool(created)

    def _append_args(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[object]:
        args: list[object] = [
            _f(now),
            _f(now - policy.dedupe_window),
            "1" if policy.dedupe_window > 0 else "",
            policy.discard,
            policy.max_messages,
            policy.max_bytes,
            DEFAULT_GROUP if policy.default_group else "",
            self._notify_name,
            channel,
            len(messages),
        ]
        for m in messages:
            attributes = dict(m.attributes)
            size = len(m.payload) + (_attributes_size(attributes) if attributes else 0)
            args += (
                m.id,
                m.payload,
                json.dumps(attributes, ensure_ascii=False, separators=(",", ":")) if attributes else "",
                _f(now + m.ttl) if m.ttl > 0 else "",
                size,
            )
        return args

    @staticmethod
    def _append_results(channel: str, policy: ChannelPolicy, reply: list[Any]) -> list[AppendResult]:
        results = reply[1]
        if results == b"full":
            raise ResourceExhausted(
                f"channel '{channel}' is full (max_messages={policy.max_messages}, "
                f"max_bytes={policy.max_bytes}, discard=reject): consume or purge it, or raise its limits"
            )
        return [AppendResult(int(results[i]), bool(results[i + 1])) for i in range(0, len(results), 2)]

    @_translated
    async def append(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[AppendResult]:
        await self._register(channel)
        k = Keys(self.prefix, channel)
        reply = await self._run(
            "append", [k.m, k.s, k.d, k.dt], self._append_args(channel, messages, now, policy)
        )
        return self._append_results(channel, policy, reply)

    @_repeatable
    async def read_range(self, channel: str, after_seq: int, limit: int) -> list[Stored]:
        if limit <= 0:
            return []
        k = Keys(self.prefix, channel)
        entries = await self._redis().xrange(k.s, f"{max(after_seq, 0) + 1}-0", "+", count=limit)
        return [_stored(e) for e in entries]

    @_repeatable
    async def last_seq(self, channel: str) -> int:
        value = await self._redis().hget(Keys(self.prefix, channel).m, "last")
        return int(value) if value is not None else 0

    # -- groups ------------------------------------------------------------------------------
    @_repeatable
    async def ensure_group(self, channel: str, group: str, start: StartSpec, now: float) -> bool:
        await self._register(channel)
        kind: str = start.kind
        if kind == "default":
            kind = "earliest" if group == DEFAULT_GROUP else "new"
        value = ""
        if kind == "seq":
            kind, value = "cursor", str(max(0, int(start.value) - 1))
        elif kind == "time":
            value = _f(start.value)
        k = Keys(self.prefix, channel)
        return bool(await self._run("ensure_group", [k.m, k.s], [group, kind, value]))

    @_translated
    async def read_new(
        self, channel: str, group: str, consumer: str, limit: int, deadline: float
    ) -> list[Stored]:
        if limit <= 0:
            return []
        k = Keys(self.prefix, channel)
        entries = await self._run(
            "read_new", [k.s, k.z(group)], [group, consumer, min(limit, _MAX_TAKE), _f(deadline)]
        )
        return [_stored(e) for e in entries]

    @_translated
    async def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        if limit <= 0:
            return []
        k = Keys(self.prefix, channel)
        reply = await self._run(
            "claim",
            [k.s, k.z(group), k.r(group), k.m],
            [group, consumer, min(limit, _MAX_TAKE), _f(now), _f(deadline)],
        )
        out = []
        for entry_id, fields, attempt, reason in reply:
            m = _stored([entry_id, fields])
            m.attempt = int(attempt)
            m.reason = reason.decode() if reason else EXPIRED_REASON
            out.append(m)
        return out

    @_repeatable
    async def next_deadline(self, channel: str, group: str) -> float | None:
        first = await self._redis().zrange(Keys(self.prefix, channel).z(group), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    @_repeatable
    async def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        members = unique(seqs)
        if not members:
            return 0
        k = Keys(self.prefix, channel)
        return int(await self._run("ack", [k.s, k.z(group), k.r(group)], [group, *members]))

    async def _set_deadline(
        self, channel: str, group: str, seqs: Sequence[int], deadline: float, reason: str
    ) -> int:
        members = unique(seqs)
        if not members:
            return 0
        k = Keys(self.prefix, channel)
        return int(
            await self._run("set_deadline", [k.z(group), k.r(group)], [_f(deadline), reason, *members])
        )

    @_repeatable
    async def nack(
        self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str
    ) -> int:
        return await self._set_deadline(channel, group, seqs, visible_at, reason or EXPIRED_REASON)

    @_repeatable
    async def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        return await self._set_deadline(channel, group, seqs, deadline, "")

    @_repeatable
    async def pending(self, channel: str, group: str, limit: int = 1000) -> list[PendingEntry]:
        if limit <= 0:
            return []
        k = Keys(self.prefix, channel)
        reply = await self._run("pending", [k.s, k.z(group), k.r(group)], [group, limit])
        return [
            PendingEntry(
                _seq(entry_id),
                consumer.decode(),
                float(deadline) if deadline else 0.0,
                int(attempt),
                reason.decode(),
            )
            for entry_id, consumer, attempt, deadline, reason in reply
        ]

    @_repeatable
    async def groups(self, channel: str) -> list[str]:
        names = await self._run("groups", [Keys(self.prefix, channel).s], [])
        return sorted(n.decode() for n in names)

    @_repeatable
    async def delete_group(self, channel: str, group: str) -> bool:
        k = Keys(self.prefix, channel)
        return bool(await self._run("delete_group", [k.s], [k.base, group]))

    @_translated
    async def dead_letter(
        self, channel: str, group: str, messages: Sequence[Stored], now: float, policy: ChannelPolicy
    ) -> None:
        """Standalone Redis: append to ``<channel>.dead-letter`` and ack, in one script. A cluster
        keeps the two channels in different slots: there it is append, then ack (at least once:
        a crash in between leaves a copy in both places, never in neither)."""
        if not messages:
            return
        if self.cluster:
            await super().dead_letter(channel, group, messages, now, policy)
            return
        dl = channel + DEAD_LETTER_SUFFIX
        await self._register(dl)
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
        k, kd = Keys(self.prefix, channel), Keys(self.prefix, dl)
        members = unique(m.seq for m in messages)
        reply = await self._run(
            "dead_letter",
            [k.s, k.z(group), k.r(group), kd.m, kd.s, kd.d, kd.dt],
            [group, len(members), *members, *self._append_args(dl, moved, now, policy)],
        )
        self._append_results(dl, policy, reply)

    # -- retention and admin -----------------------------------------------------------------
    @_repeatable
    async def trim(
        self, channel: str, policy: ChannelPolicy, now: float, keep_from: int | None = None
    ) -> TrimReport:
        k = Keys(self.prefix, channel)
        acked, aged, dropped, expired, oldest = await self._run(
            "trim",
            [k.m, k.s, k.d, k.dt],
            [
                "" if keep_from is None else keep_from,
                _f(now),
                _f(now - policy.max_age),
                _f(now - policy.dedupe_window),
                policy.max_messages,
                policy.max_bytes,
                _CONSUMER_IDLE_MS,
            ],
        )
        return TrimReport(
            acked=int(acked),
            aged=int(aged),
            dropped=int(dropped),
            expired=int(expired),
            oldest=float(oldest) if oldest else 0.0,
        )

    @_repeatable
    async def channels(self) -> list[str]:
        client = self._redis()
        names = sorted(n.decode() for n in await client.smembers(self._registry))
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(Keys(self.prefix, name).m)
        found = await pipe.execute()
        return [name for name, there in zip(names, found, strict=True) if there]

    @_repeatable
    async def stats(self, channel: str) -> ChannelStats | None:
        k = Keys(self.prefix, channel)
        reply = await self._run("stats", [k.m, k.s], [])
        if not reply[0]:
            return None
        _, last, depth, nbytes, first, oldest, dropped, groups = reply
        last = int(last)
        return ChannelStats(
            name=channel,
            depth=int(depth),
            bytes=int(nbytes),
            first_seq=int(first) if depth else last + 1,
            last_seq=last,
            oldest_publish_time=float(oldest) if oldest else 0.0,
            groups=[
                GroupStats(name.decode(), int(cursor), max(0, last - int(cursor)), int(pending))
                for name, cursor, pending in sorted(groups)
            ],
            dropped=int(dropped),
        )

    @_translated
    async def purge(self, channel: str) -> int:
        k = Keys(self.prefix, channel)
        return int(await self._run("purge", [k.m, k.s], [k.base]))

    @_translated
    async def delete(self, channel: str) -> bool:
        k = Keys(self.prefix, channel)
        existed = bool(await self._run("delete", [k.m, k.s, k.d, k.dt], [k.base]))
        await self._redis().srem(self._registry, channel)
        self._registered.pop(channel, None)
        return existed

    # -- waiting for other nodes' appends ----------------------------------------------------
    async def wait(self, channel: str, after_seq: int, timeout: float) -> int:
        """Return once the channel's last seq is beyond ``after_seq`` (or after ``timeout``),
        whichever broker node appended: appends publish a note that wakes this at once."""
        notifier = self._notifier
        if notifier is None:
            raise Unavailable(f"the redis store {self._display} is not open (not started, or closed)")
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            # Registered before looking, so a note that arrives meanwhile is not missed.
            fut = notifier.register(channel)
            try:
                last = await self.last_seq(channel)
                if last > after_seq:
                    return last
                remaining = until - loop.time()
                if remaining <= 0:
                    return last
                try:
                    seq = await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return await self.last_seq(channel)
                if seq > after_seq:
                    return seq
                # -1: the notifier reconnected (notes may be lost): look again
            finally:
                notifier.unregister(channel, fut)
