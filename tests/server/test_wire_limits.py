"""What gRPC's own filters do on the broker's server (which runs them fused, see
pushchannel._grpc_env): compressed requests and responses work on both services, and the
16 MiB request limit holds for the decompressed size too, so a small gzip bomb is refused
before it is taken into memory."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.app import MAX_MESSAGE_BYTES

from .helpers import STEP, Subscriber, consumer_count, eventually, msg, publish, rpc_error, seed_stub, stub

pytestmark = pytest.mark.timeout(60)

GZIP = grpc.Compression.Gzip


async def test_gzip_both_ways_on_the_broker_service(broker_target: str) -> None:
    payloads = [f"reading {i}: ".encode() + b"0" * 4000 for i in range(20)]
    async with grpc.aio.insecure_channel(broker_target, compression=GZIP) as channel:
        broker = stub(channel)
        results = await publish(broker, "gz.a", *(msg(p) for p in payloads))
        assert [r.seq for r in results] == list(range(1, 21))
        async with Subscriber(channel, ack_on_receipt=True) as sub:
            await sub.open("gz.a", position=pb.Open.EARLIEST)
            got = await sub.take(20)
    assert [d.payload for d in got] == payloads


async def test_gzip_on_the_seed_service(broker_target: str) -> None:
    text = "seed " + "x" * 5000
    async with grpc.aio.insecure_channel(broker_target, compression=GZIP) as channel:
        seed = seed_stub(channel)
        stream = seed.PushMessageStream(push_pb2.ConnRequest(channel="gz.seed"))

        async def opened() -> bool:  # the seed protocol has no Opened: ask the broker
            return await consumer_count(stub(channel), "gz.seed") == 1

        await eventually(opened)
        reply = await seed.SubmitMessage(
            push_pb2.SubmitRequest(channel="gz.seed", message=text), timeout=STEP
        )
        assert reply.reply == "received"
        first = await asyncio.wait_for(stream.read(), STEP)
        stream.cancel()
    assert isinstance(first, push_pb2.MessageReply) and first.message == text


def _over_the_limit() -> pb.PublishRequest:
    """17 payloads of 1 MiB (each within max_payload): 17 MiB, over the 16 MiB request limit,
    and about 17 KB once gzipped."""
    n = MAX_MESSAGE_BYTES // (1 << 20) + 1
    return pb.PublishRequest(channel="big.a", messages=[msg(b"\0" * (1 << 20)) for _ in range(n)])


@pytest.mark.parametrize("compression", [None, GZIP], ids=["plain", "gzip-bomb"])
async def test_a_request_over_16_mib_is_refused_and_the_broker_goes_on(
    broker_target: str, compression: grpc.Compression | None
) -> None:
    request = _over_the_limit()
    assert request.ByteSize() > MAX_MESSAGE_BYTES
    async with grpc.aio.insecure_channel(broker_target, compression=compression) as channel:
        broker = stub(channel)
        err = await rpc_error(broker.Publish(request, timeout=STEP))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        # nothing of it was stored, and the broker still takes a publish on the same connection
        assert [r.seq for r in await publish(broker, "big.a", "after")] == [1]
