"""What survives a restart of a broker subprocess on SQLite, both a graceful one (SIGTERM) and
``kill -9``: durable groups keep their place, deliveries in flight come back with a higher
attempt, the dedupe window, and messages waiting for the ``default`` group. Also ``--fsync
full``."""

from __future__ import annotations

import json

import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from tests.durability._broker import (
    BrokerProcess,
    channel_info,
    connect,
    group_info,
    open_channel,
    run_serve,
)
from tests.server.helpers import Subscriber, eventually, msg, publish
from tests.server.helpers import stub as pb_stub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CH = "jobs.restart"
ACK_DEADLINE_MS = 2000  # after kill -9, what was in flight comes back once this ran out
AFTER_RESTART = ACK_DEADLINE_MS / 1000 + 5.0  # the bound for a delivery after a restart
HOW = pytest.mark.parametrize("how", ["sigterm", "kill9"])


def ids(*numbers: int) -> list[str]:
    return [f"m{n}" for n in numbers]


async def publish_ids(target: str, *message_ids: str) -> list[pb.PublishResult]:
    async with connect(target) as stub:
        return await publish(stub, CH, *(msg(f"payload {i}", id=i) for i in message_ids))


@HOW
async def test_a_durable_group_keeps_its_place_and_in_flight_deliveries_come_back(tmp_path, how):
    broker = BrokerProcess(tmp_path, "--heartbeat", "1")
    try:
        await broker.start()
        assert [r.seq for r in await publish_ids(broker.target, *ids(1, 2, 3, 4, 5, 6))] == [1, 2, 3, 4, 5, 6]
        async with open_channel(broker.target) as channel:
            sub = Subscriber(channel)
            await sub.open(
                CH, group="g", position=pb.Open.EARLIEST, max_in_flight=10, ack_deadline_ms=ACK_DEADLINE_MS
            )
            first = await sub.take(6)
            assert [(d.seq, d.attempt) for d in first] == [(s, 1) for s in range(1, 7)]
            sub.ack(*(d.delivery_tag for d in first[:4]))  # 5 and 6 stay in flight
            stub = pb_stub(channel)

            async def acks_applied() -> bool:
                return group_info(await channel_info(stub, CH), "g").pending == 2

            await eventually(acks_applied)
            await broker.restart(how)
            await sub.close()

        async with open_channel(broker.target) as channel:
            g = group_info(await channel_info(pb_stub(channel), CH), "g")
            assert (g.cursor, g.pending) == (6, 2), g
            assert [r.seq for r in await publish_ids(broker.target, *ids(7, 8, 9, 10))] == [7, 8, 9, 10]
            # EARLIEST only matters for a new group: this one carries on where it was.
            async with Subscriber(channel, ack_on_receipt=True) as again:
                await again.open(CH, group="g", position=pb.Open.EARLIEST, max_in_flight=100)
                got = await again.take(6, timeout=AFTER_RESTART)
                got += await again.collect_for(0.5)
            by_seq = {d.seq: d for d in got}
            assert sorted(by_seq) == [5, 6, 7, 8, 9, 10], [(d.seq, d.attempt) for d in got]
            assert len(got) == 6, [(d.seq, d.attempt) for d in got]
            assert by_seq[5].attempt >= 2 and by_seq[6].attempt >= 2, (by_seq[5], by_seq[6])
            assert [by_seq[s].attempt for s in (7, 8, 9, 10)] == [1, 1, 1, 1]
            assert [by_seq[s].payload for s in (5, 6)] == [b"payload m5", b"payload m6"]
    finally:
        broker.stop()


@HOW
async def test_the_dedupe_window_survives_a_restart(tmp_path, how):
    broker = BrokerProcess(tmp_path)
    try:
        await broker.start()
        before = await publish_ids(broker.target, "order-1", "order-2", "order-3")
        assert [(r.seq, r.duplicate) for r in before] == [(1, False), (2, False), (3, False)]
        await broker.restart(how)
        again = await publish_ids(broker.target, "order-2", "order-4", "order-1")
        assert [(r.seq, r.duplicate) for r in again] == [(2, True), (4, False), (1, True)]
        async with connect(broker.target) as stub:
            info = await channel_info(stub, CH)
        assert (info.depth, info.last_seq) == (4, 4)  # each message stored once
    finally:
        broker.stop()


@HOW
async def test_the_default_group_keeps_what_was_published_before_anyone_connected(tmp_path, how):
    broker = BrokerProcess(tmp_path)
    try:
        await broker.start()
        await publish_ids(broker.target, *ids(1, 2, 3, 4, 5))
        await broker.restart(how)
        async with open_channel(broker.target) as channel, Subscriber(channel, ack_on_receipt=True) as sub:
            await sub.open(CH)  # the default group
            got = await sub.take(5)
            assert [(d.seq, d.id, d.payload, d.attempt) for d in got] == [
                (n, f"m{n}", f"payload m{n}".encode(), 1) for n in range(1, 6)
            ]
            assert await sub.collect_for(0.3) == []
    finally:
        broker.stop()


async def test_fsync_full_is_shown_by_print_config_and_survives_kill_9(tmp_path):
    db = tmp_path / "full.db"
    printed = run_serve("--store", f"sqlite:///{db}", "--fsync", "full", "--print-config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    config = json.loads(printed.stdout)
    assert (config["fsync"], config["store_url"]) == ("full", f"sqlite:///{db}")
    assert not db.exists()  # printing the config opens nothing

    broker = BrokerProcess(tmp_path, "--fsync", "full", db=db)
    try:
        await broker.start()
        published = await publish_ids(broker.target, *(f"f{n}" for n in range(100)))
        assert [r.seq for r in published] == list(range(1, 101))
        await broker.restart("kill9")
        async with open_channel(broker.target) as channel, Subscriber(channel, ack_on_receipt=True) as sub:
            await sub.open(CH)
            got = await sub.take(100)
            assert [d.id for d in got] == [f"f{n}" for n in range(100)]
    finally:
        broker.stop()
