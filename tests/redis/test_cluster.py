"""A real local Redis Cluster (3 primaries on loopback, made with ``redis-cli --cluster create``):
broker nodes on ``redis+cluster://``, channels spread over the cluster's slots.

The store conformance suite runs on a cluster too (``redis-cluster`` in tests/store)."""

from __future__ import annotations

from typing import Any

from pushchannel.core.model import DEAD_LETTER_SUFFIX, DEFAULT_GROUP, ChannelPolicy, NewMessage
from tests.redis.conftest import RawSubscriber, publish
from tests.redis_server import LocalCluster, command, redis_package

redis = redis_package()

from pushchannel.store._redis_support import Keys  # noqa: E402
from pushchannel.store.redis import RedisStore  # noqa: E402

T0 = 1_700_000_000.25


def _owner(cluster: LocalCluster, key: str) -> int:
    """The port of the node that serves ``key``'s slot (the others answer MOVED)."""
    for node in cluster.nodes:
        if not command(node.port, "TYPE", key).startswith(b"-MOVED"):
            return node.port
    raise AssertionError(f"no node serves the slot of {key}")


async def test_channels_spread_over_the_cluster(redis_cluster: LocalCluster) -> None:
    store = RedisStore(redis_cluster.url + "?prefix=spread:")
    await store.start()
    try:
        names = [f"hosts.h{i}" for i in range(30)]
        for name in names:
            await store.append(name, [NewMessage(name.encode())], T0, ChannelPolicy())
        owners = {_owner(redis_cluster, Keys("spread:", n).s) for n in names}
        assert len(owners) == 3  # every node holds some channels
        assert await store.channels() == sorted(names)
        for name in names:
            (m,) = await store.read_new(name, DEFAULT_GROUP, "c1", 10, T0 + 30)
            assert m.payload == name.encode()
    finally:
        await store.close()


async def test_dead_letter_across_slots_is_append_then_ack(redis_cluster: LocalCluster) -> None:
    store = RedisStore(redis_cluster.url + "?prefix=dl:")
    await store.start()
    ch = "hosts.poisoned"
    dl = ch + DEAD_LETTER_SUFFIX
    try:
        assert redis.crc.key_slot(Keys("dl:", ch).s.encode()) != redis.crc.key_slot(
            Keys("dl:", dl).s.encode()
        )
        await store.append(ch, [NewMessage(b"poison")], T0, ChannelPolicy())
        (m,) = await store.read_new(ch, DEFAULT_GROUP, "c1", 10, T0 + 30)
        await store.dead_letter(ch, DEFAULT_GROUP, [m], T0 + 1, ChannelPolicy())
        assert await store.pending(ch, DEFAULT_GROUP) == []
        (moved,) = await store.read_range(dl, 0, 10)
        assert (moved.payload, moved.attributes["pushchannel.origin_channel"]) == (b"poison", ch)
    finally:
        await store.close()


async def test_two_broker_nodes_on_a_cluster(redis_cluster: LocalCluster, start_node: Any) -> None:
    url = redis_cluster.url + "?prefix=nodes:"
    a = start_node(url, "a", "--max-delivery-attempts", "2")
    b = start_node(url, "b", "--max-delivery-attempts", "2")
    subs = {name: RawSubscriber(b.target, name) for name in ("hosts.x", "hosts.y", "hosts.z")}
    try:
        for sub in subs.values():
            await sub.opened()
        # Publishes on A reach consumers on B, whatever node of the cluster holds the channel.
        for name, sub in subs.items():
            (seq,) = await publish(a.target, name, name.encode())
            (d,) = await sub.deliveries(timeout=5.0)
            assert (d.seq, d.payload) == (seq, name.encode())
            sub.ack([d])
        # A message nacked past its attempts moves to the dead-letter channel (another slot).
        sub = subs["hosts.x"]
        dead = RawSubscriber(a.target, "hosts.x" + DEAD_LETTER_SUFFIX)
        try:
            await dead.opened()
            await publish(a.target, "hosts.x", b"poison")
            for attempt in (1, 2):
                (d,) = await sub.deliveries(timeout=5.0)
                assert (d.payload, d.attempt) == (b"poison", attempt)
                sub.nack([d], "bad input")
            (d,) = await dead.deliveries(timeout=5.0)
            assert d.payload == b"poison"
            assert d.attributes["pushchannel.origin_channel"] == "hosts.x"
            assert d.attributes["pushchannel.reason"] == "nack: bad input"
            dead.ack([d])
        finally:
            await dead.close()
    finally:
        for sub in subs.values():
            await sub.close()
