"""Admin RPCs: ListChannels, GetChannel, PurgeChannel, DeleteChannel, DeleteGroup."""

from __future__ import annotations

import time

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1.broker_pb2_grpc import BrokerStub

from .helpers import STEP, Subscriber, eventually, publish, rpc_error, stub

pytestmark = pytest.mark.timeout(30)

CH = "hosts.paris-2"


async def _info(broker: BrokerStub, channel: str = CH) -> pb.ChannelInfo:
    info: pb.ChannelInfo = await broker.GetChannel(pb.GetChannelRequest(channel=channel), timeout=STEP)
    return info


async def test_get_channel_reports_depth_groups_and_consumers(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    payloads = [f"payload-{i}".encode() for i in range(10)]
    t0 = time.time()
    await publish(broker, CH, *payloads)
    async with Subscriber(grpc_channel) as worker, Subscriber(grpc_channel) as watcher:
        opened = await worker.open(CH, group="g", position=pb.Open.EARLIEST, max_in_flight=4)
        assert len(await worker.take(4)) == 4
        watched = await watcher.open(CH, mode=pb.Open.BROADCAST)
        info = await _info(broker)
        t1 = time.time()

    assert info.name == CH
    assert (info.depth, info.first_seq, info.last_seq) == (10, 1, 10)
    assert info.bytes == sum(len(p) for p in payloads)
    assert 0.0 <= info.oldest_age_s <= t1 - t0 + 0.01
    assert (info.dropped, info.expired) == (0, 0)
    groups = {g.name: (g.cursor, g.lag, g.pending, g.consumers) for g in info.groups}
    assert groups == {"default": (0, 10, 0, 0), "g": (4, 6, 4, 1)}

    consumers = {c.id: c for c in info.consumers}
    assert set(consumers) == {opened.consumer, watched.consumer}
    w = consumers[opened.consumer]
    assert (w.group, w.in_flight, w.broadcast) == ("g", 4, False)
    assert "127.0.0.1" in w.peer
    assert t0 * 1000 - 1 <= w.since_ms <= t1 * 1000 + 1
    b = consumers[watched.consumer]
    assert (b.group, b.broadcast) == (watched.group, True)


async def test_get_channel_of_a_missing_channel_is_not_found(grpc_channel: grpc.aio.Channel) -> None:
    err = await rpc_error(_info(stub(grpc_channel), "no.such.channel"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.channel" in (err.details() or "")


async def test_get_channel_with_a_bad_name_is_invalid(grpc_channel: grpc.aio.Channel) -> None:
    err = await rpc_error(_info(stub(grpc_channel), "bad name"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_channels_with_and_without_prefix(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, "adm.a", "1")
    await publish(broker, "adm.b", "1", "2")
    await publish(broker, "other", "1")
    resp = await broker.ListChannels(pb.ListChannelsRequest(prefix="adm."), timeout=STEP)
    assert [(c.name, c.depth) for c in resp.channels] == [("adm.a", 1), ("adm.b", 2)]
    resp = await broker.ListChannels(pb.ListChannelsRequest(), timeout=STEP)
    assert [c.name for c in resp.channels] == ["adm.a", "adm.b", "other"]


async def test_purge_empties_the_channel_and_it_goes_on(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, *(str(i) for i in range(5)))
    resp = await broker.PurgeChannel(pb.PurgeChannelRequest(channel=CH), timeout=STEP)
    assert resp.purged == 5
    info = await _info(broker)
    assert (info.depth, info.bytes, info.last_seq) == (0, 0, 5)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        assert await sub.collect_for(0.3) == []
        (r,) = await publish(broker, CH, "after")
        (d,) = await sub.take(1)
        assert (d.seq, d.payload) == (r.seq, b"after") == (6, b"after")


async def test_purge_drops_what_was_in_flight(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "a", "b")
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, ack_deadline_ms=200)
        assert len(await sub.take(2)) == 2
        await broker.PurgeChannel(pb.PurgeChannelRequest(channel=CH), timeout=STEP)
        assert await sub.collect_for(0.5) == []  # past the deadline: nothing comes back
    info = await _info(broker)
    (g,) = info.groups
    assert (g.name, g.pending, g.lag) == ("default", 0, 0)


async def test_delete_group(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, group="reports")
    assert {g.name for g in (await _info(broker)).groups} == {"default", "reports"}
    resp = await broker.DeleteGroup(pb.DeleteGroupRequest(channel=CH, group="reports"), timeout=STEP)
    assert resp.deleted
    assert {g.name for g in (await _info(broker)).groups} == {"default"}
    resp = await broker.DeleteGroup(pb.DeleteGroupRequest(channel=CH, group="reports"), timeout=STEP)
    assert not resp.deleted


async def test_delete_group_ends_its_live_streams(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, group="reports")
        await broker.DeleteGroup(pb.DeleteGroupRequest(channel=CH, group="reports"), timeout=STEP)
        err = await sub.wait_ended()
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND
    assert "reports" in (err.details() or "")


async def test_a_channel_without_its_default_group_keeps_nothing(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "before")
    resp = await broker.DeleteGroup(pb.DeleteGroupRequest(channel=CH, group="default"), timeout=STEP)
    assert resp.deleted
    await publish(broker, CH, "x", "y", "z")

    async def emptied() -> bool:
        info = await _info(broker)
        return info.depth == 0 and not info.groups

    await eventually(emptied, timeout=3.0)  # the retention sweep runs every 0.2 s here


async def test_delete_channel(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    await publish(broker, CH, "1", "2")
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH, group="g")
        resp = await broker.DeleteChannel(pb.DeleteChannelRequest(channel=CH), timeout=STEP)
        assert resp.deleted
        err = await sub.wait_ended()
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(_info(broker))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    resp = await broker.DeleteChannel(pb.DeleteChannelRequest(channel=CH), timeout=STEP)
    assert not resp.deleted
    names = [c.name for c in (await broker.ListChannels(pb.ListChannelsRequest(), timeout=STEP)).channels]
    assert CH not in names
    # Used again, it starts afresh.
    (r,) = await publish(broker, CH, "new")
    assert r.seq == 1
    async with Subscriber(grpc_channel) as sub:
        await sub.open(CH)
        (d,) = await sub.take(1)
        assert (d.seq, d.payload) == (1, b"new")


async def test_consumers_disappear_when_their_streams_end(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    subs = [Subscriber(grpc_channel) for _ in range(3)]
    for i, s in enumerate(subs):
        await s.open(CH, mode=pb.Open.BROADCAST if i == 2 else pb.Open.QUEUE)
    assert len((await _info(broker)).consumers) == 3
    for s in subs:
        await s.close()

    async def gone() -> bool:
        return not (await _info(broker)).consumers

    await eventually(gone)
    (g,) = (await _info(broker)).groups
    assert (g.name, g.consumers) == ("default", 0)
