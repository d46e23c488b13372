"""SPEC §3 over the wire: redelivery, acks, broadcast, groups, flow control, dedupe, ttl,
start positions, round trips and heartbeats, against a real in-process broker."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1.broker_pb2_grpc import BrokerStub
from pushchannel.server.app import RunningServer

from .helpers import STEP, Subscriber, eventually, msg, publish, publish_payloads, stub

pytestmark = pytest.mark.timeout(30)

CH = "hosts.berlin-1"


# -- redelivery ----------------------------------------------------------------------------------
async def test_unacked_messages_of_a_cancelled_stream_go_to_another_consumer_as_attempt_2(
    grpc_channel: grpc.aio.Channel,
) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "m1", "m2", "m3")
    first = Subscriber(grpc_channel)
    await first.open(CH)
    taken = await first.take(3)
    assert [(d.seq, d.attempt) for d in taken] == [(1, 1), (2, 1), (3, 1)]

    async with Subscriber(grpc_channel) as second:
        await second.open(CH)
        assert await second.collect_for(0.2) == []  # all three are out with the first
        await first.close()
        again = await second.take(3)
        assert sorted((d.seq, d.attempt, d.payload) for d in again) == [
            (1, 2, b"m1"),
            (2, 2, b"m2"),
            (3, 2, b"m3"),
        ]
        assert await second.collect_for(0.2) == []


async def test_what_a_group_had_out_when_its_last_consumer_left_comes_back_on_reconnect(
    grpc_channel: grpc.aio.Channel,
) -> None:
    await publish(stub(grpc_channel), CH, "m1", "m2")
    async with Subscriber(grpc_channel) as first:
        await first.open(CH, group="g", position=pb.Open.EARLIEST)
        assert [d.attempt for d in await first.take(2)] == [1, 1]
    async with Subscriber(grpc_channel) as second:
        await second.open(CH, group="g")
        again = await second.take(2)
        assert sorted((d.seq, d.attempt) for d in again) == [(1, 2), (2, 2)]


async def test_a_delivery_not_acked_within_its_deadline_is_redelivered(
    grpc_channel: grpc.aio.Channel,
) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, ack_deadline_ms=300)
        t0 = time.time()
        await publish(stub(grpc_channel), CH, "late")
        (d1,) = await sub.take(1)
        assert (d1.seq, d1.attempt) == (1, 1)
        (d2,) = await sub.take(1)
        waited = time.time() - t0
        assert (d2.seq, d2.attempt, d2.payload) == (1, 2, b"late")
        assert waited >= 0.3, f"redelivered after {waited:.3f} s, before the 0.3 s deadline"
        sub.ack(d2.delivery_tag)
        assert await sub.collect_for(0.5) == []  # acked: the deadline no longer applies


async def test_nack_with_delay_redelivers_not_before_the_delay(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        await publish(stub(grpc_channel), CH, "retry me")
        (d1,) = await sub.take(1)
        t_nack = time.time()
        sub.nack(d1.delivery_tag, delay_ms=500, reason="busy")
        (d2,) = await sub.take(1)
        waited = time.time() - t_nack
        assert (d2.seq, d2.attempt, d2.payload) == (1, 2, b"retry me")
        assert waited >= 0.5, f"redelivered {waited:.3f} s after a nack with a 0.5 s delay"


async def test_nack_without_delay_redelivers_at_once(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)  # ack deadline 30 s: only the nack can bring it back within 1 s
        await publish(stub(grpc_channel), CH, "again")
        (d1,) = await sub.take(1)
        sub.nack(d1.delivery_tag)
        (d2,) = await sub.take(1, timeout=STEP)  # far sooner than the 30 s ack deadline
        assert (d2.seq, d2.attempt) == (1, 2)


async def test_modify_deadline_postpones_redelivery(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, ack_deadline_ms=200)
        await publish(stub(grpc_channel), CH, "slow work")
        (d1,) = await sub.take(1)
        t_mod = time.time()
        sub.modify_deadline(d1.delivery_tag, deadline_ms=1000)
        assert await sub.collect_for(0.7) == []  # well past the original 0.2 s
        (d2,) = await sub.take(1)
        waited = time.time() - t_mod
        assert (d2.seq, d2.attempt) == (1, 2)
        assert waited >= 1.0, f"redelivered {waited:.3f} s after extending the deadline to 1 s"


async def test_modify_deadline_can_also_shorten_the_deadline(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, max_in_flight=1)  # ack deadline 30 s
        await publish(stub(grpc_channel), CH, "give it back soon")
        (d1,) = await sub.take(1)
        t_mod = time.time()
        sub.modify_deadline(d1.delivery_tag, deadline_ms=200)
        (d2,) = await sub.take(1)  # within 5 s, far sooner than the original 30 s
        waited = time.time() - t_mod
        assert (d2.seq, d2.attempt) == (1, 2)
        assert waited >= 0.2


# -- broadcast and groups ------------------------------------------------------------------------
N = 1000


def _payloads() -> list[bytes]:
    return [f"m{i}".encode() for i in range(1, N + 1)]


async def test_every_broadcast_subscriber_gets_every_message(grpc_channel: grpc.aio.Channel) -> None:
    subs = [Subscriber(grpc_channel, ack_on_receipt=True) for _ in range(3)]
    try:
        names = set()
        for s in subs:
            opened = await s.open(CH, mode=pb.Open.BROADCAST)
            names.add(opened.group)
        assert len(names) == 3  # each its own anonymous group
        await publish_payloads(stub(grpc_channel), CH, _payloads())
        for s in subs:
            got = await s.take(N)
            assert [d.seq for d in got] == list(range(1, N + 1))
            assert [d.payload for d in got] == _payloads()
            assert await s.collect_for(0.1) == []
    finally:
        for s in subs:
            await s.close()


async def test_every_named_group_gets_every_message(grpc_channel: grpc.aio.Channel) -> None:
    g1, g2 = Subscriber(grpc_channel, ack_on_receipt=True), Subscriber(grpc_channel, ack_on_receipt=True)
    try:
        await g1.open(CH, group="billing")
        await g2.open(CH, group="audit")
        await publish_payloads(stub(grpc_channel), CH, _payloads())
        for s in (g1, g2):
            got = await s.take(N)
            assert [d.seq for d in got] == list(range(1, N + 1))
            assert {d.attempt for d in got} == {1}
            assert await s.collect_for(0.1) == []
    finally:
        await g1.close()
        await g2.close()


async def test_within_a_group_each_message_goes_to_exactly_one_consumer(
    grpc_channel: grpc.aio.Channel,
) -> None:
    a, b = Subscriber(grpc_channel, ack_on_receipt=True), Subscriber(grpc_channel, ack_on_receipt=True)
    try:
        await a.open(CH, group="workers")
        await b.open(CH, group="workers")
        await publish_payloads(stub(grpc_channel), CH, _payloads())
        await eventually(lambda: _total_at_least(N, a, b), timeout=10.0)
        await asyncio.sleep(0.2)  # room for a stray duplicate to show up
        seqs_a = [d.seq for d in a.received]
        seqs_b = [d.seq for d in b.received]
        assert sorted(seqs_a + seqs_b) == list(range(1, N + 1))  # each exactly once
        assert seqs_a and seqs_b, "both consumers of the group should get some"
        assert seqs_a == sorted(seqs_a) and seqs_b == sorted(seqs_b)  # first deliveries in seq order
    finally:
        await a.close()
        await b.close()


# -- flow control --------------------------------------------------------------------------------
async def test_max_in_flight_bounds_unacked_deliveries(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as slow, Subscriber(grpc_channel, ack_on_receipt=True) as fast:
        await slow.open(CH, max_in_flight=5)
        await publish_payloads(broker, CH, [f"m{i}".encode() for i in range(1, 21)])
        held = await slow.take(5)
        assert [d.seq for d in held] == [1, 2, 3, 4, 5]
        assert await slow.collect_for(0.5) == []  # never acks: never more than 5
        info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
        assert [c.in_flight for c in info.consumers] == [5]

        await fast.open(CH)
        rest = await fast.take(15)
        assert [d.seq for d in rest] == list(range(6, 21))
        assert await fast.collect_for(0.2) == []
        assert len(slow.received) == 5


async def test_max_in_flight_bounds_a_broadcast_subscriber_too(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, mode=pb.Open.BROADCAST, max_in_flight=3)
        await publish_payloads(stub(grpc_channel), CH, [f"m{i}".encode() for i in range(1, 11)])
        held = await sub.take(3)
        assert [d.seq for d in held] == [1, 2, 3]
        assert await sub.collect_for(0.3) == []
        sub.ack(*(d.delivery_tag for d in held))
        assert [d.seq for d in await sub.take(3)] == [4, 5, 6]


async def test_broadcast_subscribers_at_different_cursors_each_get_everything_in_order(
    grpc_channel: grpc.aio.Channel,
) -> None:
    """One fan feeds every broadcast subscription of a channel: a held-back subscriber, one
    that kept up and one that joined from the earliest message each read at their own pace."""
    broker = stub(grpc_channel)
    async with (
        Subscriber(grpc_channel) as held,
        Subscriber(grpc_channel, ack_on_receipt=True) as fast,
        Subscriber(grpc_channel, ack_on_receipt=True) as late,
    ):
        await held.open(CH, mode=pb.Open.BROADCAST, max_in_flight=2)
        await fast.open(CH, mode=pb.Open.BROADCAST, max_in_flight=7)
        await publish_payloads(broker, CH, [f"m{i}".encode() for i in range(1, 31)])
        assert [d.seq for d in await fast.take(30)] == list(range(1, 31))  # not held back
        assert [d.seq for d in await held.take(2)] == [1, 2]
        await late.open(CH, mode=pb.Open.BROADCAST, position=pb.Open.EARLIEST, max_in_flight=4)
        await publish_payloads(broker, CH, [f"m{i}".encode() for i in range(31, 41)])
        assert [d.seq for d in await late.take(40)] == list(range(1, 41))
        assert [d.seq for d in await fast.take(10)] == list(range(31, 41))
        for _ in range(19):  # the held one, two at a time
            held.ack(*(d.delivery_tag for d in held.received[-2:]))
            await held.take(2)
        assert [d.seq for d in held.received] == list(range(1, 41))
        assert [d.payload for d in late.received] == [f"m{i}".encode() for i in range(1, 41)]
        for s in (held, fast, late):
            assert await s.collect_for(0.1) == []


async def test_auto_ack_acks_what_was_written(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, max_in_flight=5, auto_ack=True)
        await publish_payloads(broker, CH, [f"m{i}".encode() for i in range(1, 21)])
        got = await sub.take(20)  # never acked by hand, yet more than max_in_flight arrive
        assert [d.seq for d in got] == list(range(1, 21))

        async def settled() -> bool:
            info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
            return [(g.pending, g.lag) for g in info.groups] == [(0, 0)]

        await eventually(settled)
    async with Subscriber(grpc_channel) as again:
        await again.open(CH)
        assert await again.collect_for(0.3) == []  # acked: never redelivered


# -- idempotent publish --------------------------------------------------------------------------
async def test_publishing_the_same_id_twice_stores_it_once(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    (r1,) = await publish(broker, CH, msg("x", id="cmd-42"))
    (r2,) = await publish(broker, CH, msg("x again", id="cmd-42"))
    assert (r1.seq, r1.duplicate) == (1, False)
    assert (r2.seq, r2.duplicate) == (1, True)
    (r3,) = await publish(broker, CH, msg("other", id="cmd-43"))
    assert (r3.seq, r3.duplicate) == (2, False)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        got = await sub.take(2)
        assert [(d.seq, d.id, d.payload) for d in got] == [(1, "cmd-42", b"x"), (2, "cmd-43", b"other")]
        assert await sub.collect_for(0.2) == []


async def test_duplicates_within_one_batch(grpc_channel: grpc.aio.Channel) -> None:
    results = await publish(stub(grpc_channel), CH, msg("a", id="a"), msg("b", id="b"), msg("a2", id="a"))
    assert [(r.seq, r.duplicate) for r in results] == [(1, False), (2, False), (1, True)]


async def test_dedupe_is_per_channel(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    (r1,) = await publish(broker, "chan-a", msg("x", id="same"))
    (r2,) = await publish(broker, "chan-b", msg("x", id="same"))
    assert (r1.seq, r1.duplicate) == (1, False)
    assert (r2.seq, r2.duplicate) == (1, False)


# -- ttl -----------------------------------------------------------------------------------------
async def test_a_message_past_its_ttl_is_never_delivered(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, msg("reboot", ttl_ms=200))
    await asyncio.sleep(0.5)
    await publish(broker, CH, msg("fresh"))
    await asyncio.sleep(0.5)  # the retention sweep (every 0.2 s here) has seen the channel by now
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        (d,) = await sub.take(1)
        assert (d.seq, d.payload) == (2, b"fresh")
        assert await sub.collect_for(0.3) == []
    info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
    assert info.expired == 1, "a message dropped for its ttl is counted as expired (SPEC §2.2)"


async def test_a_redelivery_past_the_ttl_does_not_happen(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        await publish(broker, CH, msg("reboot", ttl_ms=300))
        (d,) = await sub.take(1)
        sub.nack(d.delivery_tag, delay_ms=500)  # visible again only after the ttl ran out
        assert await sub.collect_for(0.8) == []
    info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
    assert info.expired == 1


async def test_a_message_within_its_ttl_is_delivered(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, msg("soon", ttl_ms=5000))
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        (d,) = await sub.take(1)
        assert d.payload == b"soon"


# -- start positions and durable groups ----------------------------------------------------------
async def test_start_positions_of_new_named_groups(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "old1", "old2", "old3")
    earliest = Subscriber(grpc_channel, ack_on_receipt=True)
    new = Subscriber(grpc_channel, ack_on_receipt=True)
    from_seq = Subscriber(grpc_channel, ack_on_receipt=True)
    default_pos = Subscriber(grpc_channel, ack_on_receipt=True)
    try:
        await earliest.open(CH, group="g-earliest", position=pb.Open.EARLIEST)
        await new.open(CH, group="g-new", position=pb.Open.NEW)
        await from_seq.open(CH, group="g-seq", start_seq=2)
        await default_pos.open(CH, group="g-default")  # a new named group starts at NEW
        assert [d.seq for d in await earliest.take(3)] == [1, 2, 3]
        assert [d.seq for d in await from_seq.take(2)] == [2, 3]
        assert await new.collect_for(0.3) == []
        assert await default_pos.collect_for(0.01) == []
        await publish(broker, CH, "new4")
        for s in (earliest, new, from_seq, default_pos):
            (d,) = await s.take(1)
            assert (d.seq, d.payload) == (4, b"new4")
    finally:
        for s in (earliest, new, from_seq, default_pos):
            await s.close()


async def test_a_named_group_can_start_at_a_time(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "before-1", "before-2")
    await asyncio.sleep(0.05)
    start_ms = int(time.time() * 1000)
    await asyncio.sleep(0.01)
    await publish(broker, CH, "after-3", "after-4")
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        await sub.open(CH, group="by-time", start_time_ms=start_ms)
        assert [d.payload for d in await sub.take(2)] == [b"after-3", b"after-4"]
        assert await sub.collect_for(0.2) == []
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        await sub.open(CH, mode=pb.Open.BROADCAST, start_time_ms=start_ms)
        assert [d.payload for d in await sub.take(2)] == [b"after-3", b"after-4"]


async def test_broadcast_from_earliest_sees_the_backlog(grpc_channel: grpc.aio.Channel) -> None:
    await publish(stub(grpc_channel), CH, "b1", "b2")
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        await sub.open(CH, mode=pb.Open.BROADCAST, position=pb.Open.EARLIEST)
        assert [d.payload for d in await sub.take(2)] == [b"b1", b"b2"]


async def test_a_named_group_keeps_its_place_while_nobody_is_connected(
    grpc_channel: grpc.aio.Channel,
) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "1", "2", "3")
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        await sub.open(CH, group="durable", position=pb.Open.EARLIEST)
        assert [d.seq for d in await sub.take(3)] == [1, 2, 3]
        await _settled(broker, "durable", pending=0)
    await publish(broker, CH, "4", "5")
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        # EARLIEST applies only when the group is first created: it resumes where it was.
        await sub.open(CH, group="durable", position=pb.Open.EARLIEST)
        assert [d.seq for d in await sub.take(2)] == [4, 5]
        assert await sub.collect_for(0.2) == []


async def test_the_default_group_keeps_messages_published_before_any_subscriber(
    grpc_channel: grpc.aio.Channel,
) -> None:
    await publish(stub(grpc_channel), CH, "first", "second", "third")
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        assert [d.payload for d in await sub.take(3)] == [b"first", b"second", b"third"]


@pytest.mark.parametrize(
    "receive_limit",
    [
        pytest.param(None, id="grpc-default-4MiB"),
        pytest.param(16 << 20, id="sdk-16MiB"),
    ],
)
async def test_many_messages_of_the_largest_size_are_delivered(
    broker_target: str, receive_limit: int | None
) -> None:
    """Batches must fit gRPC message limits whatever their messages' sizes (20 x 1 MiB here)."""
    options = [] if receive_limit is None else [("grpc.max_receive_message_length", receive_limit)]
    async with grpc.aio.insecure_channel(broker_target, options=options) as channel:
        broker = stub(channel)
        for i in range(20):
            await publish(broker, CH, msg(bytes([i]) * (1 << 20)))
        async with Subscriber(channel, ack_on_receipt=True) as sub:
            await sub.open(CH)
            got = await sub.take(20)
            assert sub.error is None
        assert [(d.seq, d.attempt, d.payload[0], len(d.payload)) for d in got] == [
            (i + 1, 1, i, 1 << 20) for i in range(20)
        ]


# -- round trip and heartbeat --------------------------------------------------------------------
async def test_id_attributes_payload_and_publish_time_round_trip(grpc_channel: grpc.aio.Channel) -> None:
    payload = bytes(range(256)) * 3
    attrs = {"k": "v", "ünï": "çødé ✓", "empty": ""}
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        before = int(time.time() * 1e6)
        (r,) = await publish(stub(grpc_channel), CH, msg(payload, id="cmd-1", attributes=attrs))
        after = int(time.time() * 1e6)
        (d,) = await sub.take(1)
    assert d.channel == CH
    assert d.seq == r.seq == 1
    assert d.id == "cmd-1"
    assert d.payload == payload
    assert dict(d.attributes) == attrs
    assert before <= d.publish_time_us <= after
    assert d.attempt == 1
    assert d.delivery_tag != 0


async def test_opened_reports_the_settings(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        opened = await sub.open(CH, group="g", max_in_flight=7, ack_deadline_ms=1500)
    assert (opened.channel, opened.group) == (CH, "g")
    assert (opened.max_in_flight, opened.ack_deadline_ms, opened.heartbeat_interval_ms) == (7, 1500, 500)
    assert opened.consumer
    async with Subscriber(grpc_channel) as sub:
        opened = await sub.open(CH)
    assert (opened.group, opened.max_in_flight, opened.ack_deadline_ms) == ("default", 100, 30000)


async def test_a_heartbeat_arrives_on_an_idle_subscription(
    grpc_channel: grpc.aio.Channel, broker_server: RunningServer
) -> None:
    assert broker_server.broker.config.heartbeat_interval == 0.5
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        await asyncio.wait_for(sub.heartbeat_arrived.wait(), 2.0)
        hb = sub.heartbeats[0]
        assert abs(hb.server_time_us / 1e6 - time.time()) < 1.0
        await eventually(lambda: _at_least(len(sub.heartbeats), 2), timeout=3.0)  # and they go on
        assert sub.received == []


# -- small waits ---------------------------------------------------------------------------------
async def _at_least(value: int, n: int) -> bool:
    return value >= n


async def _total_at_least(n: int, *subs: Subscriber) -> bool:
    return sum(len(s.received) for s in subs) >= n


async def _settled(broker: BrokerStub, group: str, *, pending: int) -> None:
    async def check() -> bool:
        info = await broker.GetChannel(pb.GetChannelRequest(channel=CH), timeout=STEP)
        return any(g.name == group and g.pending == pending for g in info.groups)

    await eventually(check)
