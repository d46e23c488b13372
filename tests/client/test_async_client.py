"""AsyncClient against a real in-process broker (memory store, heartbeat 0.5 s)."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

import pushchannel
from pushchannel import AsyncClient, Message, OutgoingMessage, PublishResult
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

WAIT = 5.0  # seconds any single expected event may take


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture):
    """Fail on what asyncio only logs: destroyed pending tasks, unretrieved exceptions."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not errors


@pytest.fixture
async def client(broker_target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(broker_target) as c:
        yield c


async def take(messages: AsyncIterator[Message], n: int, timeout: float = WAIT) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        async for m in messages:
            out.append(m)
            if len(out) == n:
                break
    return out


async def consumers(grpc_channel: grpc.aio.Channel, channel: str) -> int:
    """Connected consumers of ``channel``, as the broker's admin API lists them."""
    get_channel = grpc_channel.unary_unary(
        "/pushchannel.v1.Broker/GetChannel",
        request_serializer=pb.GetChannelRequest.SerializeToString,
        response_deserializer=pb.ChannelInfo.FromString,
    )
    info: pb.ChannelInfo = await get_channel(pb.GetChannelRequest(channel=channel))
    return len(info.consumers)


async def eventually(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_publish_subscribe_round_trip(client: AsyncClient) -> None:
    first = await client.publish("hosts.berlin-1", b"reboot", attributes={"k": "v"}, id="cmd-42")
    second = await client.publish("hosts.berlin-1", "grüße")
    assert first == PublishResult(seq=1, duplicate=False)
    assert second.seq == 2

    sub = client.subscribe("hosts.berlin-1")
    a, b = await take(sub, 2)
    await sub.aclose()
    assert (a.channel, a.seq, a.id, a.payload, a.attributes, a.attempt) == (
        "hosts.berlin-1",
        1,
        "cmd-42",
        b"reboot",
        {"k": "v"},
        1,
    )
    assert b.payload == "grüße".encode()
    assert isinstance(a.publish_time, datetime) and a.publish_time.tzinfo is not None
    assert abs(a.publish_time - datetime.now(UTC)) < timedelta(minutes=1)


async def test_attributes_round_trip(client: AsyncClient) -> None:
    attributes = {"empty": "", "unicode": "ünï", "long": "x" * 4096, **{f"k{i}": str(i) for i in range(60)}}
    await client.publish("attrs", b"p", attributes=attributes)
    await client.publish_many("attrs", [OutgoingMessage(b"q", attributes={"a": "1"})])
    a, b = await take(client.subscribe("attrs", auto_ack=True), 2)
    assert a.attributes == attributes
    assert b.attributes == {"a": "1"}


async def test_generated_ids_and_duplicates(client: AsyncClient) -> None:
    one = await client.publish("ids", b"same")
    two = await client.publish("ids", b"same")
    assert one.seq != two.seq and not one.duplicate and not two.duplicate

    fixed = await client.publish("ids", b"x", id="order-7")
    again = await client.publish("ids", b"x", id="order-7")
    assert again == PublishResult(seq=fixed.seq, duplicate=True)

    results = await client.publish_many(
        "ids", [OutgoingMessage(b"y", id="order-7"), OutgoingMessage(b"z", id="order-8"), b"w"]
    )
    assert [r.duplicate for r in results] == [True, False, False]
    assert results[0].seq == fixed.seq

    received = await take(client.subscribe("ids", auto_ack=True), 5)
    assert [m.seq for m in received] == [1, 2, 3, 4, 5]
    generated = [m.id for m in received if m.id not in ("order-7", "order-8")]
    assert len(generated) == 3 and len(set(generated)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in generated)


async def test_publish_many_splits_into_batches(client: AsyncClient) -> None:
    # The broker refuses more than 1000 messages per Publish, so 2500 only pass if split.
    payloads = [f"m{i}" for i in range(2500)]
    results = await client.publish_many("many", payloads)
    assert [r.seq for r in results] == list(range(1, 2501))
    assert not any(r.duplicate for r in results)

    received = await take(client.subscribe("many", max_in_flight=1000, auto_ack=True), 2500, timeout=30)
    assert [m.payload.decode() for m in received] == payloads


async def test_publish_many_splits_large_payloads_by_size(client: AsyncClient) -> None:
    big = [bytes([i]) * (900 * 1024) for i in range(6)]  # 5.4 MiB: more than one call
    results = await client.publish_many("big", big)
    assert [r.seq for r in results] == [1, 2, 3, 4, 5, 6]
    received = await take(client.subscribe("big", auto_ack=True), 6)
    assert [m.payload for m in received] == big


async def test_ack_is_not_redelivered_and_nack_is(client: AsyncClient) -> None:
    await client.publish_many("acks", [b"a", b"b"])
    sub = client.subscribe("acks", max_in_flight=1)
    (a,) = await take(sub, 1)
    assert (a.payload, a.attempt) == (b"a", 1)
    await a.nack()
    (again,) = await take(sub, 1)
    assert (again.seq, again.attempt) == (a.seq, 2)
    await again.ack()
    (b,) = await take(sub, 1)
    assert (b.payload, b.attempt) == (b"b", 1)
    await b.ack()
    await sub.aclose()

    # Nothing left for the group: a fresh subscriber gets only what comes next.
    await client.publish("acks", b"c")
    (c,) = await take(client.subscribe("acks"), 1)
    assert (c.payload, c.attempt) == (b"c", 1)


async def test_nack_with_delay(client: AsyncClient) -> None:
    await client.publish("delay", b"later")
    async with client.subscribe("delay") as sub:
        (m,) = await take(sub, 1)
        started = time.monotonic()
        await m.nack(delay=0.5, reason="busy")
        (m2,) = await take(sub, 1)
        assert m2.seq == m.seq and m2.attempt == 2
        assert time.monotonic() - started >= 0.4
        await m2.ack()


async def test_unacked_messages_come_back_after_the_stream_ends(client: AsyncClient) -> None:
    await client.publish_many("unacked", [b"1", b"2"])
    async with client.subscribe("unacked") as sub:
        await take(sub, 2)  # and never acked
    again = await take(client.subscribe("unacked"), 2)
    assert sorted((m.payload, m.attempt) for m in again) == [(b"1", 2), (b"2", 2)]


async def test_settling_is_idempotent_and_harmless_after_close(client: AsyncClient) -> None:
    await client.publish("late", b"x")
    sub = client.subscribe("late")
    (m,) = await take(sub, 1)
    await sub.aclose()
    await m.ack()
    await m.ack()
    m.nack()  # works without await too: the settlement is queued by the call itself
    assert m.nack() is m.ack()


async def test_auto_ack(client: AsyncClient) -> None:
    await client.publish("auto", b"fire-and-forget")
    # Closed on leaving `async with`; a merely dropped subscription closes a moment later,
    # and meanwhile would get (and auto-ack) the next message.
    async with client.subscribe("auto", auto_ack=True) as sub:
        (m,) = await take(sub, 1)
        await m.ack()  # a no-op
    await client.publish("auto", b"next")
    (n,) = await take(client.subscribe("auto"), 1)
    assert n.payload == b"next"


async def test_start_positions(client: AsyncClient) -> None:
    await client.publish_many("starts", [b"1", b"2", b"3"])
    earliest = await take(client.subscribe("starts", group="g-earliest", start="earliest", auto_ack=True), 3)
    assert [m.seq for m in earliest] == [1, 2, 3]
    from_seq = await take(client.subscribe("starts", group="g-seq", start=2, auto_ack=True), 2)
    assert [m.seq for m in from_seq] == [2, 3]

    async with client.subscribe("starts", group="g-new", start="new", auto_ack=True) as new:
        await client.publish("starts", b"4")
        (m,) = await take(new, 1)
        assert m.seq == 4

    past = datetime.now(UTC) - timedelta(hours=1)
    by_time = await take(client.subscribe("starts", group="g-time", start=past, auto_ack=True), 4)
    assert [m.seq for m in by_time] == [1, 2, 3, 4]

    # The default group, start not given, keeps what was published before anyone came.
    default = await take(client.subscribe("starts", auto_ack=True), 4)
    assert [m.seq for m in default] == [1, 2, 3, 4]


async def test_broadcast_gets_every_message(client: AsyncClient) -> None:
    async with (
        client.subscribe("news", broadcast=True) as one,
        client.subscribe("news", broadcast=True) as two,
    ):
        assert one.group and two.group and one.group != two.group
        await client.publish_many("news", [b"a", b"b"])
        assert [m.payload for m in await take(one, 2)] == [b"a", b"b"]
        assert [m.payload for m in await take(two, 2)] == [b"a", b"b"]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.publish("bad channel!", b"x"),
        lambda c: c.publish_many(".hidden", [b"x"]),
        lambda c: take(c.subscribe("bad channel!"), 1),
    ],
    ids=["publish", "publish_many", "subscribe"],
)
async def test_bad_channel_name_is_invalid_argument(client: AsyncClient, call) -> None:
    with pytest.raises(pushchannel.InvalidArgument) as caught:
        await call(client)
    assert isinstance(caught.value, pushchannel.PushChannelError)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "A-Z a-z 0-9" in str(caught.value)  # the broker's rule, kept word for word
    assert not isinstance(caught.value, grpc.RpcError)


async def test_payload_too_large_is_invalid_argument(client: AsyncClient) -> None:
    with pytest.raises(pushchannel.InvalidArgument):
        await client.publish("big", b"x" * (2 << 20))


async def test_unreachable_broker_is_unavailable_after_the_retry_deadline() -> None:
    retry = pushchannel.RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=0.5)
    async with AsyncClient("127.0.0.1:1", retry=retry) as c:
        started = time.monotonic()
        with pytest.raises(pushchannel.Unavailable, match="gave up"):
            await c.publish("x", b"y")
        assert 0.4 < time.monotonic() - started < WAIT
        with pytest.raises(pushchannel.Unavailable, match="gave up"):
            await take(c.subscribe("x"), 1)


async def test_break_out_of_async_for_closes_the_stream(
    client: AsyncClient, grpc_channel: grpc.aio.Channel
) -> None:
    await client.publish_many("brk", [b"1", b"2", b"3"])
    async for m in client.subscribe("brk", max_in_flight=1):
        await m.ack()
        break
    await eventually(lambda: _no_consumers(grpc_channel, "brk"))

    sub = client.subscribe("brk")
    await take(sub, 1)
    assert await consumers(grpc_channel, "brk") == 1
    await sub.aclose()
    await sub.aclose()  # idempotent
    assert await consumers(grpc_channel, "brk") == 0 or await _eventually_none(grpc_channel, "brk")
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def _no_consumers(grpc_channel: grpc.aio.Channel, channel: str) -> bool:
    return await consumers(grpc_channel, channel) == 0


async def _eventually_none(grpc_channel: grpc.aio.Channel, channel: str) -> bool:
    await eventually(lambda: _no_consumers(grpc_channel, channel))
    return True


async def test_many_subscriptions_do_not_leak(client: AsyncClient, grpc_channel: grpc.aio.Channel) -> None:
    # Each break hands the next message to a stream that is about to close (attempt + 1),
    # so publish plenty: this test is about streams and tasks, not about delivery.
    await client.publish_many("leak", [str(i) for i in range(200)])
    for _ in range(20):
        async for m in client.subscribe("leak", max_in_flight=1):
            await m.ack()
            break
    for _ in range(20):
        await client.subscribe("leak", group="opened-only").open()  # dropped at once
    await eventually(lambda: _no_consumers(grpc_channel, "leak"))
    await asyncio.sleep(0.05)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(n.startswith("pushchannel-") for n in names)


async def test_timeout_waiting_for_a_message_keeps_the_stream(client: AsyncClient) -> None:
    async with client.subscribe("patient") as sub:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(sub), 0.1)
        await client.publish("patient", b"finally")
        (m,) = await take(sub, 1)
        assert (m.payload, m.attempt) == (b"finally", 1)


async def test_heartbeats_refresh_last_frame_time(client: AsyncClient) -> None:
    async with client.subscribe("quiet") as sub:
        opened_at = sub.last_frame_time
        assert opened_at is not None
        await asyncio.sleep(1.2)  # the test broker beats every 0.5 s
        assert sub.last_frame_time is not None and sub.last_frame_time > opened_at


async def test_client_close_ends_iteration_in_another_task(broker_target: str) -> None:
    client = AsyncClient(broker_target)
    sub = client.subscribe("closing")
    await sub.open()

    async def consume() -> list[Message]:
        return [m async for m in sub]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    await client.close()
    assert await asyncio.wait_for(task, WAIT) == []
    await client.close()  # idempotent
    with pytest.raises(RuntimeError):
        await client.publish("closing", b"x")


async def test_argument_checks(client: AsyncClient) -> None:
    with pytest.raises(ValueError):
        client.subscribe("x", max_in_flight=0)
    with pytest.raises(ValueError):
        client.subscribe("x", start="latest")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.subscribe("x", start=0)
    with pytest.raises(TypeError):
        await client.publish("x", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.publish("x", b"y", ttl=0)
