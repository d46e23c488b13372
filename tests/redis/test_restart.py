"""Redis going down and coming back under a running broker node."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.redis.conftest import RawSubscriber, publish
from tests.redis_server import RedisServer, require_redis

CH = "hosts.berlin-1"


@pytest.fixture
def durable_redis(tmp_path: Path) -> Any:
    """A redis-server with AOF (appendfsync everysec): what it acknowledged survives its own
    crash (the writes are in the OS' cache), so a restart on the same port finds the data."""
    require_redis()
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_down_publish_unavailable_subscriber_stays_and_resumes(
    durable_redis: RedisServer, start_node: Any
) -> None:
    """Publishes go to node A, the subscriber is on node B: after the restart B must hear of A's
    appends again (its notifications reconnect), not only of its own."""
    node = start_node(durable_redis.url, "a")
    other = start_node(durable_redis.url, "b")
    sub = RawSubscriber(other.target, CH)
    try:
        await sub.opened()
        (first,) = await publish(node.target, CH, b"before")
        (d,) = await sub.deliveries(timeout=5.0)
        assert (d.seq, d.payload) == (first, b"before")
        sub.ack([d])
        await asyncio.sleep(0.2)  # the ack reaches Redis

        durable_redis.kill()  # kill -9: Redis crashes
        # A publish while Redis is down: UNAVAILABLE at once, saying what is wrong.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await publish(node.target, CH, b"lost")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis" in (info.value.details() or "")
        assert time.monotonic() - started < 3.0
        # The subscriber stays connected: heartbeats go on, the stream does not end.
        beats = sub.heartbeats
        with pytest.raises(TimeoutError):
            await sub.deliveries(timeout=1.5)
        assert sub.heartbeats > beats
        assert node.proc.poll() is None and other.proc.poll() is None

        durable_redis.start()  # same port, same directory: the AOF brings the data back
        async with asyncio.timeout(15):
            while True:
                try:
                    (seq,) = await publish(node.target, CH, b"after", timeout=2.0)
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    await asyncio.sleep(0.2)
        assert seq == first + 1  # the log went on where it was: nothing acknowledged was lost
        (d,) = await sub.deliveries(timeout=10.0)
        assert (d.seq, d.payload, d.attempt) == (seq, b"after", 1)
        sub.ack([d])
        assert node.proc.poll() is None and other.proc.poll() is None
    finally:
        await sub.close()
    # The brokers said what happened, and did not spin meanwhile.
    for log in (node.log(), other.log()):
        assert "unavailable" in log
        assert log.count("\n") < 400, log[-2000:]
