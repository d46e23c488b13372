"""SPEC §8 row by row: every bad input gets its status code and a message naming the rule,
and nothing stored is lost or corrupted by it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.config import BrokerConfig
from pushchannel.core.model import ChannelPolicy, PolicyRule
from pushchannel.server.app import RunningServer

from ..conftest import TEST_BROKER, replace
from .helpers import STEP, Subscriber, eventually, msg, publish, rpc_error, seed_stub, stub

pytestmark = pytest.mark.timeout(30)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1 << 20


@pytest.fixture
def broker_config() -> BrokerConfig:
    return replace(
        TEST_BROKER,
        policies=(
            PolicyRule("full-reject.*", ChannelPolicy(max_messages=5, discard="reject")),
            PolicyRule("full-drop.*", ChannelPolicy(max_messages=5, discard="drop-oldest")),
        ),
    )


# (channel, words the answer must contain)
BAD_CHANNELS = [
    pytest.param("", ["empty", "1-255 bytes"], id="empty"),
    pytest.param("a" * 256, ["256", "255"], id="256-bytes"),
    pytest.param("hosts berlin", ["' '", "A-Z a-z 0-9 . _ - : /"], id="space"),
    pytest.param("hosts*", ["'*'", "A-Z a-z 0-9 . _ - : /"], id="star"),
    pytest.param("hösts", ["'ö'", "A-Z a-z 0-9 . _ - : /"], id="non-ascii"),
    pytest.param(".hidden", ["starts with '.'"], id="leading-dot"),
]


def _names_rule(err: grpc.aio.AioRpcError, words: list[str]) -> None:
    details = err.details() or ""
    for w in words:
        assert w in details, f"{w!r} not in the error message {details!r}"


@pytest.mark.parametrize(("channel", "words"), BAD_CHANNELS)
async def test_bad_channel_on_publish(grpc_channel: grpc.aio.Channel, channel: str, words: list[str]) -> None:
    err = await rpc_error(publish(stub(grpc_channel), channel, "x"))
    assert err.code() == INVALID
    _names_rule(err, ["channel name", *words])


@pytest.mark.parametrize(("channel", "words"), BAD_CHANNELS)
async def test_bad_channel_on_subscribe(
    grpc_channel: grpc.aio.Channel, channel: str, words: list[str]
) -> None:
    call = stub(grpc_channel).Subscribe(iter([pb.SubscribeRequest(open=pb.Open(channel=channel))]))
    err = await rpc_error(call.read())
    assert err.code() == INVALID
    _names_rule(err, ["channel name", *words])


@pytest.mark.parametrize(("channel", "words"), BAD_CHANNELS)
async def test_bad_channel_on_seed_submit(
    grpc_channel: grpc.aio.Channel, channel: str, words: list[str]
) -> None:
    seed = seed_stub(grpc_channel)
    err = await rpc_error(seed.SubmitMessage(push_pb2.SubmitRequest(channel=channel, message="x")))
    assert err.code() == INVALID
    _names_rule(err, ["channel name", *words])


@pytest.mark.parametrize(("channel", "words"), BAD_CHANNELS)
async def test_bad_channel_on_seed_stream(
    grpc_channel: grpc.aio.Channel, channel: str, words: list[str]
) -> None:
    seed = seed_stub(grpc_channel)
    call = seed.PushMessageStream(push_pb2.ConnRequest(channel=channel))
    err = await rpc_error(call.read())
    assert err.code() == INVALID
    _names_rule(err, ["channel name", *words])


async def test_channel_names_at_the_limits_are_accepted(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    for name in ("a" * 255, "A-Z.a_z:0-9/x", "x.", "0"):
        (r,) = await publish(broker, name, "ok")
        assert r.seq == 1


# -- message limits -------------------------------------------------------------------------------
async def test_payload_over_one_mib(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    err = await rpc_error(publish(broker, "big", b"x" * (MiB + 1)))
    assert err.code() == INVALID
    _names_rule(err, ["payload", "1048577", "1048576"])
    (r,) = await publish(broker, "big", b"x" * MiB)  # exactly the limit is fine
    assert r.seq == 1


async def test_payload_over_one_mib_on_the_seed(grpc_channel: grpc.aio.Channel) -> None:
    seed = seed_stub(grpc_channel)
    err = await rpc_error(seed.SubmitMessage(push_pb2.SubmitRequest(channel="big", message="x" * (MiB + 1))))
    assert err.code() == INVALID
    _names_rule(err, ["1048576"])


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        pytest.param({f"k{i}": "v" for i in range(65)}, ["65 attributes", "64"], id="65-pairs"),
        pytest.param({"k" * 257: "v"}, ["257 bytes", "256"], id="key-257"),
        pytest.param({"k": "v" * 4097}, ["4097 bytes", "4096"], id="value-4097"),
        pytest.param({"k": "é" * 2049}, ["4098 bytes", "4096"], id="value-in-utf8-bytes"),
    ],
)
async def test_attributes_over_the_limits(
    grpc_channel: grpc.aio.Channel, attributes: dict[str, str], words: list[str]
) -> None:
    err = await rpc_error(publish(stub(grpc_channel), "attrs", msg("x", attributes=attributes)))
    assert err.code() == INVALID
    _names_rule(err, ["attribute", *words])


async def test_attributes_at_the_limits_are_accepted(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    big = {f"k{i}": "v" for i in range(63)} | {"k" * 256: "v" * 4096}
    (r,) = await publish(broker, "attrs", msg("x", attributes=big))
    async with Subscriber(grpc_channel) as sub:
        await sub.open("attrs")
        (d,) = await sub.take(1)
    assert (d.seq, dict(d.attributes)) == (r.seq, big)


async def test_id_over_256_bytes(grpc_channel: grpc.aio.Channel) -> None:
    err = await rpc_error(publish(stub(grpc_channel), "ids", msg("x", id="i" * 257)))
    assert err.code() == INVALID
    _names_rule(err, ["id", "256"])


async def test_ttl_over_a_year(grpc_channel: grpc.aio.Channel) -> None:
    err = await rpc_error(publish(stub(grpc_channel), "ttl", msg("x", ttl_ms=366 * 24 * 3600 * 1000)))
    assert err.code() == INVALID
    _names_rule(err, ["ttl"])


async def test_more_than_1000_messages_in_one_publish(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    err = await rpc_error(publish(broker, "batch", *(["x"] * 1001)))
    assert err.code() == INVALID
    _names_rule(err, ["1001 messages", "1000"])
    assert len(await publish(broker, "batch", *(["x"] * 1000))) == 1000


async def test_no_message_in_a_publish(grpc_channel: grpc.aio.Channel) -> None:
    err = await rpc_error(publish(stub(grpc_channel), "batch"))
    assert err.code() == INVALID
    _names_rule(err, ["no message", "1 to 1000"])


# -- Subscribe ------------------------------------------------------------------------------------
async def test_subscribe_must_begin_with_open(grpc_channel: grpc.aio.Channel) -> None:
    first = pb.SubscribeRequest(ack=pb.Ack(delivery_tags=[1]))
    call = stub(grpc_channel).Subscribe(iter([first]))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    _names_rule(err, ["Open"])


async def test_subscribe_without_any_request(grpc_channel: grpc.aio.Channel) -> None:
    call = stub(grpc_channel).Subscribe(iter([]))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    _names_rule(err, ["Open"])


async def test_open_sent_twice_ends_the_stream(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        await sub.open("twice")
        sub.send(pb.SubscribeRequest(open=pb.Open(channel="twice")))
        err = await sub.wait_ended()
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    _names_rule(err, ["Open"])


async def test_ack_of_an_unknown_tag_is_ignored_and_counted(
    grpc_channel: grpc.aio.Channel, broker_server: RunningServer
) -> None:
    stats = broker_server.broker.stats
    before = stats.unknown_acks
    async with Subscriber(grpc_channel) as sub:
        await sub.open("acks")
        sub.ack(987654321, 123)
        sub.nack(555)

        async def counted() -> bool:
            return stats.unknown_acks == before + 3

        await eventually(counted)
        await publish(stub(grpc_channel), "acks", "still works")
        (d,) = await sub.take(1)
        assert d.payload == b"still works"
        sub.ack(d.delivery_tag)
        assert sub.error is None
    assert stats.unknown_acks == before + 3


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        pytest.param({"max_in_flight": 10001}, ["max_in_flight", "10001", "10000"], id="max_in_flight"),
        pytest.param({"group": ".hidden"}, ["group name"], id="group-leading-dot"),
        pytest.param({"group": "a b"}, ["group name"], id="group-space"),
        pytest.param({"ack_deadline_ms": 12 * 3600 * 1000 + 1}, ["ack deadline"], id="ack-deadline"),
        pytest.param({"start_seq": (1 << 64) - 1}, ["start seq", "out of range"], id="start-seq-huge"),
    ],
)
async def test_bad_open_fields(
    grpc_channel: grpc.aio.Channel, fields: dict[str, Any], words: list[str]
) -> None:
    call = stub(grpc_channel).Subscribe(iter([pb.SubscribeRequest(open=pb.Open(channel="ok", **fields))]))
    err = await rpc_error(call.read())
    assert err.code() == INVALID
    _names_rule(err, words)


async def test_max_in_flight_at_the_limit_is_accepted(grpc_channel: grpc.aio.Channel) -> None:
    async with Subscriber(grpc_channel) as sub:
        opened = await sub.open("ok", max_in_flight=10000)
    assert opened.max_in_flight == 10000


# -- PublishStream --------------------------------------------------------------------------------
async def test_a_bad_request_in_a_publish_stream_is_answered_and_the_stream_goes_on(
    grpc_channel: grpc.aio.Channel,
) -> None:
    good = [pb.Message(payload=b"x")]
    requests = [
        pb.PublishRequest(channel="stream", messages=good, ref=1),
        pb.PublishRequest(channel="", messages=good, ref=2),
        pb.PublishRequest(channel="stream", messages=[], ref=3),
        pb.PublishRequest(channel="stream", messages=good * 2, ref=4),
    ]
    call = stub(grpc_channel).PublishStream(iter(requests))
    responses = []
    async with asyncio.timeout(STEP):
        async for resp in call:
            responses.append(resp)
    assert [r.ref for r in responses] == [1, 2, 3, 4]
    ok1, bad_channel, empty, ok4 = responses
    assert (ok1.error_code, [r.seq for r in ok1.results]) == (0, [1])
    assert bad_channel.error_code == INVALID.value[0] == 3
    assert "channel name is empty" in bad_channel.error_message
    assert not bad_channel.results
    assert empty.error_code == 3
    assert "no message" in empty.error_message
    assert (ok4.error_code, [r.seq for r in ok4.results]) == (0, [2, 3])
    assert await call.code() == grpc.StatusCode.OK


# -- full channels --------------------------------------------------------------------------------
async def test_a_full_channel_with_discard_reject_refuses_publishes(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    ch = "full-reject.a"
    await publish(broker, ch, *(f"m{i}" for i in range(1, 6)))
    err = await rpc_error(publish(broker, ch, "m6"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _names_rule(err, ["full", "max_messages=5", "reject"])
    err = await rpc_error(publish(broker, ch, msg("m6", id="new-id")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = await broker.GetChannel(pb.GetChannelRequest(channel=ch), timeout=STEP)
    assert (info.depth, info.last_seq, info.dropped) == (5, 5, 0)  # nothing stored, nothing dropped

    # A rejected id was not remembered: once there is room, it is stored, not a duplicate.
    async with Subscriber(grpc_channel, ack_on_receipt=True) as sub:
        await sub.open(ch)
        assert [d.payload for d in await sub.take(5)] == [f"m{i}".encode() for i in range(1, 6)]

        async def room() -> bool:
            info = await broker.GetChannel(pb.GetChannelRequest(channel=ch), timeout=STEP)
            return bool(info.depth == 0)

        await eventually(room)
        (r,) = await publish(broker, ch, msg("m6", id="new-id"))
        assert (r.seq, r.duplicate) == (6, False)


async def test_a_full_channel_in_a_publish_stream_answers_and_goes_on(grpc_channel: grpc.aio.Channel) -> None:
    ch = "full-reject.stream"
    requests = [
        pb.PublishRequest(channel=ch, messages=[pb.Message(payload=b"x")] * 5, ref=10),
        pb.PublishRequest(channel=ch, messages=[pb.Message(payload=b"y")], ref=11),
        pb.PublishRequest(channel="elsewhere", messages=[pb.Message(payload=b"z")], ref=12),
    ]
    call = stub(grpc_channel).PublishStream(iter(requests))
    async with asyncio.timeout(STEP):
        responses = [r async for r in call]
    assert [(r.ref, r.error_code) for r in responses] == [(10, 0), (11, 8), (12, 0)]
    assert "full" in responses[1].error_message
    assert [r.seq for r in responses[2].results] == [1]


async def test_a_batch_that_does_not_fit_is_rejected_whole(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    ch = "full-reject.b"
    await publish(broker, ch, "a", "b", "c")
    err = await rpc_error(publish(broker, ch, "d", "e", "f"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = await broker.GetChannel(pb.GetChannelRequest(channel=ch), timeout=STEP)
    assert (info.depth, info.last_seq) == (3, 3)


async def test_a_full_channel_with_drop_oldest_drops_the_oldest(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    ch = "full-drop.a"
    results = await publish(broker, ch, *(f"m{i}" for i in range(1, 9)))
    assert [r.seq for r in results] == list(range(1, 9))
    info = await broker.GetChannel(pb.GetChannelRequest(channel=ch), timeout=STEP)
    assert (info.depth, info.first_seq, info.last_seq, info.dropped) == (5, 4, 8, 3)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(ch)
        assert [d.payload for d in await sub.take(5)] == [f"m{i}".encode() for i in range(4, 9)]


# -- nothing stored is harmed ---------------------------------------------------------------------
async def test_bad_input_loses_and_corrupts_nothing(grpc_channel: grpc.aio.Channel) -> None:
    broker = stub(grpc_channel)
    seed = seed_stub(grpc_channel)
    ch = "precious"
    payload = bytes(range(256))
    (kept,) = await publish(broker, ch, msg(payload, id="keep", attributes={"a": "1"}))

    bad_calls = [
        publish(broker, ch, b"x" * (MiB + 1)),
        publish(broker, ch, msg("x", attributes={f"k{i}": "v" for i in range(65)})),
        publish(broker, ch, msg("x", attributes={"k" * 257: "v"})),
        publish(broker, ch, msg("x", attributes={"k": "v" * 4097})),
        publish(broker, ch, *(["x"] * 1001)),
        publish(broker, ch),
        publish(broker, ch + " ", "x"),
        publish(broker, "." + ch, "x"),
        seed.SubmitMessage(push_pb2.SubmitRequest(channel=ch, message="x" * (MiB + 1))),
        stub(grpc_channel).Subscribe(iter([pb.SubscribeRequest(ack=pb.Ack(delivery_tags=[1]))])).read(),
        stub(grpc_channel)
        .Subscribe(iter([pb.SubscribeRequest(open=pb.Open(channel=ch, max_in_flight=10001))]))
        .read(),
    ]
    for call in bad_calls:
        err = await rpc_error(call)
        assert err.code() in (INVALID, grpc.StatusCode.FAILED_PRECONDITION)
    # an unknown ack and a nack on a live stream of the same channel
    async with Subscriber(grpc_channel) as sub:
        await sub.open(ch, group="other")
        sub.ack(kept.seq + 100)
        sub.nack(kept.seq + 101)
        assert await sub.collect_for(0.2) == []  # a new named group starts at NEW

    info = await broker.GetChannel(pb.GetChannelRequest(channel=ch), timeout=STEP)
    assert (info.depth, info.last_seq) == (1, 1)
    async with Subscriber(grpc_channel) as sub:
        await sub.open(ch)
        (d,) = await sub.take(1)
        assert (d.seq, d.id, d.payload, dict(d.attributes), d.attempt) == (1, "keep", payload, {"a": "1"}, 1)
        assert await sub.collect_for(0.2) == []
