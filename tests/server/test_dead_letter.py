"""Dead letters: a message that runs out of attempts moves to ``<channel>.dead-letter``."""

from __future__ import annotations

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.config import BrokerConfig
from pushchannel.server.app import RunningServer

from ..conftest import TEST_BROKER, replace
from .helpers import STEP, Subscriber, msg, publish, stub

pytestmark = pytest.mark.timeout(30)

CH = "jobs.eu"
DL = "jobs.eu.dead-letter"


@pytest.fixture
def broker_config() -> BrokerConfig:
    return replace(TEST_BROKER, max_delivery_attempts=3)


async def test_a_message_nacked_too_often_moves_to_the_dead_letter_channel(
    grpc_channel: grpc.aio.Channel, broker_server: RunningServer
) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        await publish(broker, CH, msg(b"poison", id="p-1", attributes={"tenant": "acme"}))
        attempts = []
        for _ in range(3):
            (d,) = await sub.take(1)
            attempts.append((d.seq, d.attempt))
            sub.nack(d.delivery_tag, reason="cannot parse")
        assert attempts == [(1, 1), (1, 2), (1, 3)]

        async with Subscriber(grpc_channel) as dead:
            await dead.open(DL)
            (dl,) = await dead.take(1)
        assert dl.channel == DL
        assert dl.payload == b"poison"
        assert dict(dl.attributes) == {
            "tenant": "acme",
            "pushchannel.origin_channel": CH,
            "pushchannel.origin_group": "default",
            "pushchannel.origin_seq": "1",
            "pushchannel.attempts": "3",
            "pushchannel.reason": dl.attributes["pushchannel.reason"],
        }
        assert "cannot parse" in dl.attributes["pushchannel.reason"]

        # Gone from the origin: never delivered there again, nothing pending.
        assert await sub.collect_for(0.5) == []
        info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
        (group,) = [g for g in info.groups if g.name == "default"]
        assert (group.pending, group.lag) == (0, 0)
    assert broker_server.broker.stats.dead_lettered == 1


async def test_a_message_whose_deadline_keeps_running_out_is_dead_lettered_too(
    grpc_channel: grpc.aio.Channel,
) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, ack_deadline_ms=100)
        await publish(stub(grpc_channel), CH, "slow")
        got = await sub.take(3)
        assert [d.attempt for d in got] == [1, 2, 3]
        async with Subscriber(grpc_channel) as dead:
            await dead.open(DL)
            (dl,) = await dead.take(1)
        assert dl.payload == b"slow"
        assert dl.attributes["pushchannel.attempts"] == "3"
        assert "deadline" in dl.attributes["pushchannel.reason"]
        assert await sub.collect_for(0.3) == []


async def test_other_messages_keep_flowing_past_a_poison_message(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        await publish(stub(grpc_channel), CH, "poison", "good")
        good = None
        nacks = 0
        while good is None:
            (d,) = await sub.take(1)
            if d.payload == b"poison":
                assert nacks < 3, "delivered a 4th time after max_delivery_attempts=3"
                nacks += 1
                sub.nack(d.delivery_tag)
            else:
                good = d
                sub.ack(d.delivery_tag)
        assert (good.seq, good.attempt) == (2, 1)


async def test_dead_letters_of_the_longest_channel_name_can_be_read(grpc_channel: grpc.aio.Channel) -> None:
    """A 255-byte channel is valid, so its `<channel>.dead-letter` must be reachable too."""
    ch = "x" * 255
    async with Subscriber(grpc_channel) as sub:
        await sub.open(ch)
        await publish(stub(grpc_channel), ch, "poison")
        for _ in range(3):
            (d,) = await sub.take(1)
            sub.nack(d.delivery_tag)
        assert await sub.collect_for(0.3) == []
    async with Subscriber(grpc_channel) as dead:
        await dead.open(ch + ".dead-letter")
        (dl,) = await dead.take(1)
    assert (dl.payload, dl.attributes["pushchannel.origin_channel"]) == (b"poison", ch)
