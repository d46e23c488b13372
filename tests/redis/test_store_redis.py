"""The Redis store beyond the conformance suite (tests/store runs that on Redis too): what comes
from sharing one Redis, Redis' own failures, the URL, and the key layout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pushchannel.core.model import DEAD_LETTER_SUFFIX, DEFAULT_GROUP, ChannelPolicy, NewMessage, StartSpec
from pushchannel.errors import InvalidArgument, ResourceExhausted, Unavailable
from pushchannel.store import open_store
from tests.redis_server import RedisServer, command, free_port, redis_package

redis = redis_package()

from pushchannel.store import redis as redis_store  # noqa: E402
from pushchannel.store._redis_support import Keys, parse_url  # noqa: E402
from pushchannel.store.redis import RedisStore  # noqa: E402

CH = "hosts.berlin-1"
T0 = 1_700_000_000.25
POLICY = ChannelPolicy()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_server.url)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


# -- URLs ----------------------------------------------------------------------------------------


def test_url_forms() -> None:
    u = parse_url("redis://127.0.0.1:6380/2")
    assert (u.cluster, u.host, u.port, u.db, u.prefix, u.sweep_interval) == (
        False,
        "127.0.0.1",
        6380,
        2,
        "pc:",
        1.0,
    )
    assert u.client_url == "redis://127.0.0.1:6380/2"
    u = parse_url("redis://:secret@db.example:6379/0?prefix=app1:&sweep=2.5&socket_timeout=3")
    assert (u.prefix, u.sweep_interval) == ("app1:", 2.5)
    assert u.client_url == "redis://:secret@db.example:6379/0?socket_timeout=3"
    assert "secret" not in u.address
    u = parse_url("redis+cluster://10.0.0.5:7000?prefix=x:")
    assert (u.cluster, u.port, u.db, u.client_url) == (True, 7000, 0, "redis://10.0.0.5:7000")
    assert parse_url("rediss+cluster://h:7000").client_url.startswith("rediss://")
    assert parse_url("rediss+cluster://u:pw@h:7000?ssl_ca_certs=/ca").on_node("10.0.0.2", 7001) == (
        "rediss://u:pw@10.0.0.2:7001?ssl_ca_certs=%2Fca"
    )
    assert parse_url("redis://h").port == 6379
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    assert isinstance(open_store("redis+cluster://127.0.0.1:1"), RedisStore)
    assert "secret" not in repr(RedisStore("redis://:secret@h:1/0"))


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1/x",
        "redis://h:1/0?sweep=0",
        "redis://h:1/0?sweep=abc",
        "redis+cluster://h:1/3",
        "redis://h:1/0?prefix={a}",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_url(url)


async def test_start_without_redis_is_unavailable() -> None:
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"redis at 127\.0\.0\.1:\d+/0 is unavailable"):
        await s.start()
    assert time.monotonic() - started < 5
    with pytest.raises(Unavailable, match="not open"):
        await s.append(CH, [NewMessage(b"x")], T0, POLICY)


# -- several stores (broker nodes) on one Redis --------------------------------------------------


async def test_wait_wakes_on_another_nodes_append(redis_server: RedisServer, store: RedisStore) -> None:
    other = RedisStore(redis_server.url)
    await other.start()
    try:
        await store.append(CH, [NewMessage(b"a")], T0, POLICY)
        loop = asyncio.get_running_loop()
        waiter = asyncio.create_task(store.wait(CH, 1, 30.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = loop.time()
        await other.append(CH, [NewMessage(b"b"), NewMessage(b"c")], T0, POLICY)
        async with asyncio.timeout(2):
            assert await waiter == 3
        assert loop.time() - started < 0.5
        # One node's read hands a message to one consumer: the other node gets the rest.
        a = await store.read_new(CH, DEFAULT_GROUP, "node-a", 2, T0 + 30)
        b = await other.read_new(CH, DEFAULT_GROUP, "node-b", 10, T0 + 30)
        assert ([m.seq for m in a], [m.seq for m in b]) == ([1, 2], [3])
        # A delivery that expired on one node is claimed by the other.
        got = await other.claim_expired(CH, DEFAULT_GROUP, "node-b", 10, T0 + 31, T0 + 60)
        assert sorted((m.seq, m.attempt) for m in got) == [(1, 2), (2, 2), (3, 2)]
        assert await other.channels() == await store.channels() == [CH]
    finally:
        await other.close()


async def test_concurrent_appends_from_many_nodes_get_distinct_seqs(redis_server: RedisServer) -> None:
    stores = [RedisStore(redis_server.url) for _ in range(4)]
    for s in stores:
        await s.start()
    try:
        results = await asyncio.gather(
            *(
                s.append(CH, [NewMessage(f"{i}-{j}".encode())], T0, POLICY)
                for i, s in enumerate(stores)
                for j in range(50)
            )
        )
        seqs = sorted(r.seq for rs in results for r in rs)
        assert seqs == list(range(1, 201))
        assert await stores[0].last_seq(CH) == 200
    finally:
        for s in stores:
            await s.close()


# -- Redis failing -------------------------------------------------------------------------------


async def test_redis_down_then_back(redis_server: RedisServer, store: RedisStore) -> None:
    await store.append(CH, [NewMessage(b"a")], T0, POLICY)
    redis_server.kill()
    await asyncio.sleep(0.1)
    for call in (
        store.append(CH, [NewMessage(b"b")], T0, POLICY),
        store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30),
        store.ack(CH, DEFAULT_GROUP, [1]),
        store.stats(CH),
        store.wait(CH, 1, 5.0),
    ):
        with pytest.raises(Unavailable, match=r"is unavailable.*check that Redis is running"):
            await call
    redis_server.start()  # in memory: a fresh, empty Redis on the same port
    async with asyncio.timeout(5):
        while True:
            try:
                result = await store.append(CH, [NewMessage(b"c")], T0, POLICY)
                break
            except Unavailable:
                await asyncio.sleep(0.05)
    assert result[0].seq == 1  # the data was in memory only: a new log
    # Notifications came back too.
    for _ in range(100):  # bounded: 5 s
        if store._notifier is not None and store._notifier.connects >= 2:
            break
        await asyncio.sleep(0.05)
    assert store._notifier is not None and store._notifier.connects >= 2
    waiter = asyncio.create_task(store.wait(CH, 1, 10.0))
    await asyncio.sleep(0.05)
    await store.append(CH, [NewMessage(b"d")], T0, POLICY)
    async with asyncio.timeout(2):
        assert await waiter == 2


async def test_out_of_memory_refuses_appends_whole_and_lets_consumers_make_room(
    redis_server: RedisServer, store: RedisStore
) -> None:
    policy = ChannelPolicy(max_bytes=1 << 40, max_messages=10**9)
    await store.append(CH, [NewMessage(b"x" * 1000)], T0, policy)
    used = int(next(line for line in command(redis_server.port, "INFO", "memory").decode().splitlines()
                    if line.startswith("used_memory:")).split(":")[1])  # fmt: skip
    command(redis_server.port, "CONFIG", "SET", "maxmemory", str(used + 2_000_000))
    command(redis_server.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
    stored = 1
    with pytest.raises(ResourceExhausted, match=r"full.*maxmemory"):
        for _ in range(100):
            await store.append(CH, [NewMessage(b"y" * 50_000) for _ in range(4)], T0, policy)
            stored += 4
    assert await store.last_seq(CH) == stored  # the refused batch left nothing behind
    # Consumers can still take, ack and trim, and that makes room again.
    got = await store.read_new(CH, DEFAULT_GROUP, "c1", 1000, T0 + 30)
    assert len(got) == stored
    assert await store.ack(CH, DEFAULT_GROUP, [m.seq for m in got]) == stored
    assert (await store.trim(CH, policy, T0 + 1)).acked == stored
    assert (await store.append(CH, [NewMessage(b"z" * 50_000)], T0, policy))[0].seq == stored + 1


# -- layout and housekeeping ---------------------------------------------------------------------


async def test_a_channels_keys_share_one_cluster_slot(redis_server: RedisServer, store: RedisStore) -> None:
    await store.ensure_channel(CH, POLICY, T0)
    await store.ensure_group(CH, "audit", StartSpec("earliest"), T0)
    await store.append(CH, [NewMessage(b"a", id="x")], T0, POLICY)
    await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    await store.read_new(CH, "audit", "c1", 10, T0 + 30)
    await store.nack(CH, DEFAULT_GROUP, [1], T0 + 1, "boom")
    client = redis.Redis(port=redis_server.port)
    try:
        keys = [k.decode() for k in client.scan_iter(match="pc:{" + CH + "}*")]
    finally:
        client.close()
    k = Keys("pc:", CH)
    assert sorted(keys) == sorted([k.m, k.s, k.d, k.dt, k.z(DEFAULT_GROUP), k.z("audit"), k.r(DEFAULT_GROUP)])
    assert len({redis.crc.key_slot(key.encode()) for key in keys}) == 1


async def test_dead_letter_is_one_script_on_standalone_redis(store: RedisStore) -> None:
    await store.append(CH, [NewMessage(b"poison", attributes={"k": "v"})], T0, POLICY)
    (m,) = await store.read_new(CH, DEFAULT_GROUP, "c1", 10, T0 + 30)
    full = ChannelPolicy(max_messages=1, discard="reject")
    dl = CH + DEAD_LETTER_SUFFIX
    await store.append(dl, [NewMessage(b"earlier")], T0, full)
    with pytest.raises(ResourceExhausted):
        await store.dead_letter(CH, DEFAULT_GROUP, [m], T0 + 1, full)
    # Nothing moved, nothing acked.
    assert [e.seq for e in await store.pending(CH, DEFAULT_GROUP)] == [1]
    assert [x.payload for x in await store.read_range(dl, 0, 10)] == [b"earlier"]
    await store.dead_letter(CH, DEFAULT_GROUP, [m], T0 + 1, POLICY)
    assert await store.pending(CH, DEFAULT_GROUP) == []
    assert [x.payload for x in await store.read_range(dl, 0, 10)] == [b"earlier", b"poison"]


async def test_trim_forgets_idle_consumers_that_hold_nothing(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    await store.append(CH, [NewMessage(b"a"), NewMessage(b"b")], T0, POLICY)
    await store.read_new(CH, DEFAULT_GROUP, "gone", 1, T0 + 30)
    await store.read_new(CH, DEFAULT_GROUP, "holder", 1, T0 + 30)
    await store.ack(CH, DEFAULT_GROUP, [1])
    monkeypatch.setattr(redis_store, "_CONSUMER_IDLE_MS", 0)
    await store.trim(CH, POLICY, T0 + 1)
    client = redis.Redis(port=redis_server.port)
    try:
        names = [c["name"] for c in client.xinfo_consumers(Keys("pc:", CH).s, DEFAULT_GROUP)]
    finally:
        client.close()
    assert [n.decode() if isinstance(n, bytes) else n for n in names] == ["holder"]
    assert [(e.seq, e.consumer) for e in await store.pending(CH, DEFAULT_GROUP)] == [(2, "holder")]


async def test_a_channel_deleted_on_one_node_and_made_again_on_another_is_listed(
    redis_server: RedisServer, store: RedisStore, tmp_path: Path
) -> None:
    other = RedisStore(redis_server.url)
    await other.start()
    try:
        await other.append(CH, [NewMessage(b"a")], T0, POLICY)
        assert await store.channels() == [CH]
        assert await store.delete(CH) is True
        assert await other.channels() == []
        await other.append(CH, [NewMessage(b"b")], T0, POLICY)  # `other` thinks it registered CH
        assert await store.channels() == [] or await store.channels() == [CH]
        other._registered.clear()  # what a minute does (_REGISTER_EVERY)
        await other.append(CH, [NewMessage(b"c")], T0, POLICY)
        assert await store.channels() == [CH]
    finally:
        await other.close()


async def test_start_warns_when_redis_may_evict_channels(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    command(redis_server.port, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    s = RedisStore(redis_server.url)
    with caplog.at_level("WARNING", logger="pushchannel.store.redis"):
        await s.start()
    await s.close()
    assert "maxmemory-policy allkeys-lru" in caplog.text
    assert "noeviction" in caplog.text
