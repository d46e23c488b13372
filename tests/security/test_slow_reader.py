"""A subscriber that never reads, while 100 MB are published to its channel: flow control
(max_in_flight, default 100) bounds what the broker holds for it, so the broker's memory stays
at what the store keeps plus a bounded amount; other subscribers are served meanwhile, and when
the slow one finally reads, it gets every message, in order, intact.

The broker is a subprocess on the memory store (which keeps all 100 MB: nobody acked them), so
its resident memory is measured alone (/proc/PID/status VmRSS)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

from ..server.helpers import STEP, Subscriber, stub
from .conftest import BrokerProcess, insecure_channel, rss_kib, spawn_broker, stop_broker

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

MiB = 1 << 20
PAYLOAD = 64 << 10
COUNT = 1600  # 1600 x 64 KiB = 100 MiB
BATCH = 16  # 1 MiB per publish


def payload(i: int) -> bytes:
    return struct.pack(">I", i) * (PAYLOAD // 4)


@pytest.fixture
def broker(tmp_path: Path) -> BrokerProcess:  # type: ignore[misc]
    process = spawn_broker(tmp_path / "broker.log", "--store", "memory://", "--heartbeat", "1")
    try:
        yield process
    finally:
        stop_broker(process)


def test_slow_reader_memory_is_bounded(broker: BrokerProcess) -> None:
    figures = asyncio.run(_scenario(broker))
    print(
        "\nslow reader: broker VmRSS {base:.0f} MiB before, peak {peak:.0f} MiB while 100 MiB were "
        "published (+{growth:.0f} MiB, of which 100 MiB are the stored messages), {after:.0f} MiB "
        "after the reader caught up and acked".format(**figures)
    )
    # The store holds the 100 MiB; the slow subscription adds at most max_in_flight (100) x 64
    # KiB in flight plus transport buffers. Without flow control the broker would queue a second
    # copy of all 100 MiB for the stalled stream. Generous bound: stored bytes + 60 MiB.
    assert figures["growth"] < 100 + 60, figures


async def _scenario(broker: BrokerProcess) -> dict[str, float]:
    slow_ch, fast_ch, pub_ch = (insecure_channel(broker.target) for _ in range(3))
    try:
        publisher = stub(pub_ch)
        # The slow subscriber: opens, then reads nothing at all.
        slow_requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        slow_requests.put_nowait(pb.SubscribeRequest(open=pb.Open(channel="slow")))

        async def slow_gen() -> AsyncIterator[pb.SubscribeRequest]:
            while (req := await slow_requests.get()) is not None:
                yield req

        slow = stub(slow_ch).Subscribe(slow_gen())
        opened = await asyncio.wait_for(slow.read(), STEP)
        assert isinstance(opened, pb.SubscribeResponse) and opened.opened.max_in_flight == 100

        fast = Subscriber(fast_ch, ack_on_receipt=True)
        await fast.open("fast")

        base = rss_kib(broker.pid) / 1024
        peak = base
        fast_lag: list[float] = []
        for start in range(0, COUNT, BATCH):
            batch = [pb.Message(payload=payload(i)) for i in range(start, start + BATCH)]
            await publisher.Publish(pb.PublishRequest(channel="slow", messages=batch), timeout=STEP * 2)
            if start % (BATCH * 10) == 0:  # others are served meanwhile, promptly
                sent = time.monotonic()
                await publisher.Publish(
                    pb.PublishRequest(channel="fast", messages=[pb.Message(payload=b"%d" % start)]),
                    timeout=STEP,
                )
                [d] = await fast.take(1)
                assert d.payload == b"%d" % start
                fast_lag.append(time.monotonic() - sent)
            peak = max(peak, rss_kib(broker.pid) / 1024)
        await asyncio.sleep(0.5)
        peak = max(peak, rss_kib(broker.pid) / 1024)
        assert max(fast_lag) < 1.0, fast_lag

        info = await publisher.GetChannel(pb.GetChannelRequest(channel="slow"), timeout=STEP)
        (consumer,) = info.consumers
        assert consumer.in_flight <= 100, consumer  # flow control held
        assert info.depth == COUNT

        # Now the slow one reads: everything, in order, intact.
        seq = 0
        async with asyncio.timeout(60):
            while seq < COUNT:
                resp = await slow.read()
                assert resp is not grpc.aio.EOF and isinstance(resp, pb.SubscribeResponse), resp  # type: ignore[attr-defined]
                if resp.WhichOneof("kind") != "deliveries":
                    continue
                tags = []
                for d in resp.deliveries.deliveries:
                    assert d.seq == seq + 1 and d.payload == payload(seq), d.seq
                    seq += 1
                    tags.append(d.delivery_tag)
                slow_requests.put_nowait(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=tags)))
        slow_requests.put_nowait(None)
        await fast.close()
        await asyncio.sleep(1.5)  # retention runs every second: the acked messages go
        after = rss_kib(broker.pid) / 1024
        return {"base": base, "peak": peak, "growth": peak - base, "after": after}
    finally:
        for ch in (slow_ch, fast_ch, pub_ch):
            await ch.close(None)
