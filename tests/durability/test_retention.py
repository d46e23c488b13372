"""Retention on a broker subprocess on SQLite, set by flags and by a config file: limits with
``reject`` and ``drop-oldest``, ``max_age``, interest-based deletion, and config files that are
refused with the file and the line."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from tests.durability._broker import (
    channel_info,
    connect,
    group_info,
    open_channel,
    run_serve,
    running_broker,
)
from tests.server.helpers import Subscriber, eventually, publish, rpc_error
from tests.server.helpers import stub as pb_stub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SWEEP = 5.0  # retention runs every second; what it removes is gone well within this


def payloads(first: int, last: int) -> list[str]:
    return [f"m{n}" for n in range(first, last + 1)]


async def depth(stub: broker_pb2_grpc.BrokerStub, channel: str) -> tuple[int, int, int]:
    """(depth, first_seq, last_seq)"""
    info = await channel_info(stub, channel)
    return info.depth, info.first_seq, info.last_seq


async def drain(channel: grpc.aio.Channel, name: str, n: int, group: str = "default") -> list[pb.Delivery]:
    """Take and ack ``n`` messages from a group; nothing more is waiting, the acks are applied."""
    stub = pb_stub(channel)
    async with Subscriber(channel, ack_on_receipt=True) as sub:
        await sub.open(name, group=group, position=pb.Open.EARLIEST)
        got = await sub.take(n)
        assert await sub.collect_for(0.2) == []

        async def acked() -> bool:
            return group_info(await channel_info(stub, name), group).pending == 0

        await eventually(acked)
    return got


async def test_reject_refuses_the_whole_publish_and_stores_nothing(tmp_path):
    async with (
        running_broker(tmp_path, "--max-messages", "5", "--discard", "reject") as broker,
        open_channel(broker.target) as channel,
    ):
        stub = pb_stub(channel)
        assert [r.seq for r in await publish(stub, "jobs", *payloads(1, 4))] == [1, 2, 3, 4]
        err = await rpc_error(publish(stub, "jobs", *payloads(5, 6)))  # 6 > 5: none of the two
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert err.details(), "the refusal says why"
        assert await depth(stub, "jobs") == (4, 1, 4)
        assert [r.seq for r in await publish(stub, "jobs", "m5")] == [5]
        err = await rpc_error(publish(stub, "jobs", "m6"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert await depth(stub, "jobs") == (5, 1, 5)
        got = await drain(channel, "jobs", 5)
        assert [d.payload.decode() for d in got] == payloads(1, 5)


async def test_drop_oldest_keeps_the_newest_and_counts_the_drops(tmp_path):
    async with (
        running_broker(tmp_path, "--max-messages", "5", "--discard", "drop-oldest") as broker,
        open_channel(broker.target) as channel,
    ):
        stub = pb_stub(channel)
        await publish(stub, "jobs", *payloads(1, 6))
        assert [r.seq for r in await publish(stub, "jobs", *payloads(7, 8))] == [7, 8]
        info = await channel_info(stub, "jobs")
        assert (info.depth, info.first_seq, info.last_seq, info.dropped) == (5, 4, 8, 3)
        got = await drain(channel, "jobs", 5)
        assert [(d.seq, d.payload.decode()) for d in got] == list(
            zip(range(4, 9), payloads(4, 8), strict=True)
        )


async def publish_until_aged_out(stub: broker_pb2_grpc.BrokerStub, channel: str, old: int) -> int:
    """Publish a fresh message every 0.2 s (a channel that gets publishes is trimmed at every
    sweep) until seqs 1..old are gone; how many fresh ones it took."""
    deadline = time.monotonic() + SWEEP
    for n in range(1, 1000):
        await publish(stub, channel, f"fresh{n}")
        info = await channel_info(stub, channel)
        if info.first_seq > old:
            assert info.last_seq == old + n
            return n
        assert time.monotonic() < deadline, f"messages older than max_age still there: {info}"
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def test_max_age_removes_old_messages_at_the_sweep(tmp_path):
    async with running_broker(tmp_path, "--max-age", "1s") as broker, open_channel(broker.target) as channel:
        stub = pb_stub(channel)
        await publish(stub, "jobs", *payloads(1, 5))
        assert await depth(stub, "jobs") == (5, 1, 5)
        fresh = await publish_until_aged_out(stub, "jobs", 5)
        assert fresh >= 4, "gone before they were a second old"
        async with Subscriber(channel, ack_on_receipt=True) as sub:
            await sub.open("jobs")
            first = (await sub.take(1))[0]
            assert first.seq > 5 and first.payload.startswith(b"fresh"), first


async def test_max_age_also_applies_to_a_quiet_channel_within_seconds(tmp_path):
    async with running_broker(tmp_path, "--max-age", "1s") as broker, connect(broker.target) as stub:
        await publish(stub, "quiet", *payloads(1, 5))

        async def aged_out() -> bool:
            return (await depth(stub, "quiet"))[0] == 0

        await eventually(aged_out, timeout=SWEEP, every=0.1)


async def test_a_message_goes_once_every_durable_group_acked_it(tmp_path):
    async with running_broker(tmp_path) as broker, open_channel(broker.target) as channel:
        stub = pb_stub(channel)
        # "pair" has a second durable group, "audit", created before the messages.
        async with Subscriber(channel) as audit:
            await audit.open("interest.pair", group="audit", position=pb.Open.EARLIEST)
        for name in ("interest.solo", "interest.pair"):
            await publish(stub, name, *payloads(1, 20))
            await drain(channel, name, 20)  # the default group acks everything

        async def solo_empty() -> bool:
            return (await depth(stub, "interest.solo"))[0] == 0

        await eventually(solo_empty, timeout=SWEEP, every=0.1)
        # The sweep that emptied "solo" saw the default group's acks on "pair" too; after one
        # more sweep "pair" still holds everything, as "audit" has acked nothing.
        await asyncio.sleep(1.5)
        assert await depth(stub, "interest.pair") == (20, 1, 20)
        got = await drain(channel, "interest.pair", 20, group="audit")
        assert [d.seq for d in got] == list(range(1, 21))

        async def pair_empty() -> bool:
            return (await depth(stub, "interest.pair"))[0] == 0

        await eventually(pair_empty, timeout=SWEEP, every=0.1)


CONFIG = """\
# retention by channel pattern
[[channel]]
pattern = "telemetry.*"
max_messages = 3
discard = "reject"

[[channel]]
pattern = "metrics.*"
max_messages = 2

[[channel]]
pattern = "ephemeral.*"
max_age = "1s"
"""


async def test_a_config_file_sets_retention_by_channel_pattern(tmp_path):
    config = tmp_path / "pushchannel.toml"
    config.write_text(CONFIG)
    async with running_broker(tmp_path, "--config", str(config)) as broker, connect(broker.target) as stub:
        await publish(stub, "telemetry.cpu", *payloads(1, 3))
        err = await rpc_error(publish(stub, "telemetry.cpu", "m4"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert await depth(stub, "telemetry.cpu") == (3, 1, 3)

        await publish(stub, "metrics.load", *payloads(1, 5))  # drop-oldest, the default
        assert await depth(stub, "metrics.load") == (2, 4, 5)

        await publish(stub, "other.jobs", *payloads(1, 10))  # no pattern: the defaults
        await publish(stub, "ephemeral.x", *payloads(1, 4))
        await publish_until_aged_out(stub, "ephemeral.x", 4)
        assert await depth(stub, "other.jobs") == (10, 1, 10)  # older, but its max_age is 7 days
        assert await depth(stub, "telemetry.cpu") == (3, 1, 3)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (CONFIG.replace("max_messages = 2", "max_mesages = 2"), 9, "channel.max_mesages: expected one of"),
        (CONFIG.replace("max_messages = 3", 'max_messages = "three"'), 4, "channel.max_messages: expected"),
        (CONFIG.replace('max_age = "1s"', "max_age = true"), 13, "channel.max_age: expected a duration"),
    ],
    ids=["wrong-key", "wrong-type", "wrong-duration"],
)
def test_a_wrong_config_file_stops_serve_with_file_and_line(
    tmp_path: Path, text: str, line: int, expected: str
):
    config = tmp_path / "pushchannel.toml"
    config.write_text(text)
    db = tmp_path / "never.db"
    done = run_serve(
        "--config", str(config), "--listen", "127.0.0.1:0", "--store", f"sqlite:///{db}", cwd=tmp_path
    )
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith(f"error: {config}:{line}: {expected}"), lines[0]
    assert done.stdout == ""
    assert not db.exists()
