"""Several broker nodes on one Redis: `pushchannel serve --store redis://...` processes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from tests.redis.conftest import RawSubscriber, publish
from tests.redis_server import RedisServer

CH = "hosts.berlin-1"


async def test_a_publish_on_one_node_reaches_a_consumer_on_the_other_at_once(
    redis_server: RedisServer, start_node: Any
) -> None:
    a = start_node(redis_server.url, "a")
    b = start_node(redis_server.url, "b")
    sub = RawSubscriber(b.target, CH)
    try:
        await sub.opened()
        latencies = []
        for i in range(5):
            started = time.monotonic()
            (seq,) = await publish(a.target, CH, f"m{i}".encode())
            (d,) = await sub.deliveries(timeout=5.0)
            latencies.append(time.monotonic() - started)
            assert (d.seq, d.payload, d.attempt) == (seq, f"m{i}".encode(), 1)
            sub.ack([d])
        # No polling: far below the 1 s sweep and the 30 s wait timeout.
        assert max(latencies) < 0.5, latencies
        # ...and the other way round, to a consumer on A.
        other = RawSubscriber(a.target, "hosts.other")
        try:
            await other.opened()
            await publish(b.target, "hosts.other", b"back")
            (d,) = await other.deliveries(timeout=5.0)
            assert d.payload == b"back"
        finally:
            await other.close()
    finally:
        await sub.close()


async def test_a_queue_group_hands_each_message_to_one_consumer_across_nodes(
    redis_server: RedisServer, start_node: Any
) -> None:
    nodes = [start_node(redis_server.url, "a"), start_node(redis_server.url, "b")]
    subs = [RawSubscriber(nodes[i % 2].target, CH, group="workers", max_in_flight=20) for i in range(4)]
    total = 300
    got: dict[int, list[int]] = {i: [] for i in range(len(subs))}

    async def consume(i: int, sub: RawSubscriber) -> None:
        while True:
            batch = await sub.deliveries(timeout=30.0)
            got[i] += [d.seq for d in batch]
            sub.ack(batch)

    try:
        for sub in subs:
            await sub.opened()
        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subs)]
        try:
            for n in range(0, total, 10):  # publishes alternate between the nodes
                await publish(nodes[(n // 10) % 2].target, CH, *(f"m{n + k}".encode() for k in range(10)))
            for _ in range(400):  # bounded: 20 s
                if sum(len(v) for v in got.values()) >= total:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # anything delivered twice would show up now
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        seen = Counter(s for v in got.values() for s in v)
        assert sorted(seen) == list(range(1, total + 1))
        assert [s for s, n in seen.items() if n > 1] == []
        # Both nodes' consumers took part.
        assert got[0] + got[2] and got[1] + got[3]
    finally:
        for sub in subs:
            await sub.close()


async def test_a_killed_nodes_deliveries_are_redelivered_by_the_other_node(
    redis_server: RedisServer, start_node: Any
) -> None:
    a = start_node(redis_server.url, "a")
    b = start_node(redis_server.url, "b")
    doomed = RawSubscriber(a.target, CH, ack_deadline_ms=2000)
    survivor: RawSubscriber | None = None
    try:
        await doomed.opened()
        seqs = await publish(b.target, CH, b"one", b"two", b"three")
        first = await doomed.collect(3, timeout=5.0)
        assert sorted(d.seq for d in first) == seqs  # held, never acked
        # Only now a consumer of the same group on B (a stream opens as it is made).
        survivor = RawSubscriber(b.target, CH, ack_deadline_ms=30_000)
        await survivor.opened()
        a.kill()  # kill -9: node A cannot release anything
        killed = time.monotonic()
        again = await survivor.collect(3, timeout=10.0)
        waited = time.monotonic() - killed
        assert sorted((d.seq, d.payload, d.attempt) for d in again) == [
            (seqs[0], b"one", 2),
            (seqs[1], b"two", 2),
            (seqs[2], b"three", 2),
        ]
        # Within the ack deadline (2 s) plus the sweep interval (1 s), with some slack.
        assert waited < 5.0, waited
        survivor.ack(again)
        # Nothing more comes: each message went to B exactly once.
        await publish(b.target, CH, b"four")
        (d,) = await survivor.deliveries(timeout=5.0)
        assert (d.payload, d.attempt) == (b"four", 1)
    finally:
        if survivor is not None:
            await survivor.close()
        await doomed.close()
