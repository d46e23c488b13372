"""The SDK through a fault-injecting proxy: cuts, a blackhole, refused connections."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import time

import pytest

import pushchannel
from pushchannel import AsyncClient, ConnectionState, Message, OutgoingMessage, RetryPolicy, StateChange
from pushchannel.client import backoff_ceiling
from tests.faults.conftest import HEARTBEAT, eventually
from tests.faults.proxy import FaultProxy

S = ConnectionState
FAST = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, attempt_timeout=3.0)


def state_of(sub: pushchannel.Subscription) -> ConnectionState:
    return sub.state  # read through a call: mypy would keep the first check's narrowing


async def take(sub: pushchannel.Subscription, n: int, timeout: float) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        async for m in sub:
            out.append(m)
            if len(out) == n:
                break
    return out


async def test_cut_every_half_second_while_5000_messages_flow(proxy: FaultProxy) -> None:
    n = 5000
    changes: list[StateChange] = []
    async with (
        AsyncClient(proxy.target, retry=FAST, on_state_change=changes.append) as consumer,
        AsyncClient(proxy.target, retry=FAST) as producer,
    ):
        sub = consumer.subscribe("cuts", max_in_flight=200)
        await sub.open()
        seqs_by_payload: dict[bytes, set[int]] = collections.defaultdict(set)
        received: collections.Counter[bytes] = collections.Counter()

        async def consume() -> None:
            async for m in sub:  # must never raise: every fault here is transient
                received[m.payload] += 1
                await m.ack()
                if len(received) == n:
                    return

        async def produce() -> None:
            for start in range(0, n, 25):  # ids made by the client: a retry reuses them
                batch = [f"m{i}".encode() for i in range(start, start + 25)]
                for payload, result in zip(batch, await producer.publish_many("cuts", batch), strict=True):
                    seqs_by_payload[payload].add(result.seq)
                await asyncio.sleep(0.02)  # spread over several cuts

        async def cut_every_half_second() -> None:
            for _ in range(240):  # bounded: two minutes at most
                await asyncio.sleep(0.5)
                proxy.cut()

        cutter = asyncio.create_task(cut_every_half_second())
        started = time.monotonic()
        try:
            async with asyncio.timeout(90):
                await asyncio.gather(produce(), consume())
        finally:
            cutter.cancel()
            await asyncio.gather(cutter, return_exceptions=True)
        elapsed = time.monotonic() - started
        await sub.aclose()

    expected = {f"m{i}".encode() for i in range(n)}
    assert set(received) == expected  # none lost
    assert all(len(seqs) == 1 for seqs in seqs_by_payload.values())  # none stored twice
    assert len({s for seqs in seqs_by_payload.values() for s in seqs}) == n
    duplicates = sum(received.values()) - n
    reconnects = sum(1 for c in changes if c.state is S.RECONNECTING)
    assert proxy.cuts >= 3 and reconnects >= 3, (proxy.cuts, reconnects)
    print(f"\n{n} messages in {elapsed:.1f} s, {proxy.cuts} cuts, {reconnects} reconnects,", end=" ")
    print(f"{duplicates} duplicates")


async def test_blackhole_is_detected_by_missing_heartbeats_and_recovers(
    proxy: FaultProxy, broker_target: str
) -> None:
    changes: list[StateChange] = []
    async with (
        AsyncClient(proxy.target, retry=FAST, on_state_change=changes.append) as client,
        AsyncClient(broker_target) as direct,
    ):
        sub = client.subscribe("blackhole", ack_deadline=2.0)
        await sub.open()
        await direct.publish("blackhole", b"before")
        (m,) = await take(sub, 1, timeout=5)
        await m.ack()

        proxy.blackhole()
        started = time.monotonic()
        await eventually(lambda: any(c.state is S.RECONNECTING for c in changes), 5, "a reconnect")
        detected = time.monotonic() - started
        (gone,) = [c for c in changes if c.state is S.RECONNECTING]
        assert isinstance(gone.error, pushchannel.Unavailable) and "no frame" in str(gone.error)
        # Three heartbeat intervals, give or take a beat, and well before keepalive (30 s).
        assert 2 * HEARTBEAT <= detected <= 3 * HEARTBEAT + 1.5, detected

        await direct.publish("blackhole", b"during")
        await asyncio.sleep(1.0)
        assert state_of(sub) is not S.READY  # nothing gets through while it lasts
        proxy.blackhole(False)
        (m2,) = await take(sub, 1, timeout=15)
        assert m2.payload == b"during"
        await m2.ack()
        assert state_of(sub) is S.READY
        await sub.aclose()


async def test_state_changes_in_order_across_a_cut(
    proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pushchannel.client")
    async with AsyncClient(proxy.target, retry=FAST) as client:
        sub = client.subscribe("states", group="watchers")
        seen: list[StateChange] = []
        sub.on_state_change(seen.append)
        iterated: list[StateChange] = []

        async def follow() -> None:
            async for change in sub.state_changes():
                iterated.append(change)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        assert sub.state is S.IDLE
        await sub.open()
        assert state_of(sub) is S.READY
        proxy.cut()
        await eventually(lambda: seen[-1].state is S.READY and len(seen) > 2, 10, "ready again")
        await sub.aclose()
        await asyncio.wait_for(follower, 5)

    names = " ".join(c.state.name for c in seen)
    assert re.fullmatch(r"CONNECTING READY (RECONNECTING CONNECTING )+READY CLOSED", names), names
    assert [c.state for c in iterated] == [c.state for c in seen]
    for previous, change in itertools.pairwise(seen):
        assert change.previous is previous.state
    retry = next(c for c in seen if c.state is S.RECONNECTING)
    assert retry.attempt == 1 and retry.delay is not None
    assert 0 <= retry.delay <= backoff_ceiling(FAST, 1)
    assert isinstance(retry.error, pushchannel.PushChannelError)
    assert seen[-1].error is None  # closed by the application
    lines = [r.getMessage() for r in caplog.records if r.name == "pushchannel.client"]
    assert len(lines) >= len(seen)  # a log line per change
    assert any("states (group watchers): reconnecting in" in line for line in lines)


async def test_subscription_and_publish_wait_for_a_broker_that_comes_later(proxy: FaultProxy) -> None:
    await proxy.refuse()
    changes: list[StateChange] = []
    async with AsyncClient(proxy.target, retry=FAST, on_state_change=changes.append) as client:
        sub = client.subscribe("later")
        opening = asyncio.create_task(sub.open())
        publishing = asyncio.create_task(client.publish("later", b"hello"))
        await eventually(lambda: sum(c.state is S.RECONNECTING for c in changes) >= 3, 10, "retries")
        assert not opening.done() and not publishing.done()
        await proxy.refuse(False)
        await asyncio.wait_for(opening, 10)
        result = await asyncio.wait_for(publishing, 10)
        assert result.seq == 1 and not result.duplicate
        (m,) = await take(sub, 1, timeout=5)
        assert m.payload == b"hello"
        await m.ack()
        await sub.aclose()
    # Every wait stayed within the schedule: attempt n waits at most the n-th ceiling.
    for c in changes:
        if c.state is S.RECONNECTING:
            assert c.delay is not None and 0 <= c.delay <= backoff_ceiling(FAST, c.attempt)


async def test_delay_slows_but_does_not_break(proxy: FaultProxy) -> None:
    proxy.delay = 0.05
    async with AsyncClient(proxy.target, retry=FAST) as client:
        results = await client.publish_many("slow", [OutgoingMessage(b"x", id="only-once")] * 3)
        assert [r.duplicate for r in results] == [False, True, True]
        sub = client.subscribe("slow")
        (m,) = await take(sub, 1, timeout=10)
        await m.ack()
        await sub.aclose()


async def test_broadcast_resumes_after_the_last_seq_it_saw(proxy: FaultProxy, broker_target: str) -> None:
    async with AsyncClient(proxy.target, retry=FAST) as client, AsyncClient(broker_target) as direct:
        sub = client.subscribe("news", broadcast=True)
        await sub.open()
        await direct.publish_many("news", [b"1", b"2"])
        got = await take(sub, 2, timeout=5)
        for m in got:
            await m.ack()
        await proxy.refuse()
        proxy.cut()
        await direct.publish_many("news", [b"3", b"4"])  # while it is away
        await asyncio.sleep(0.3)
        await proxy.refuse(False)
        got += await take(sub, 2, timeout=10)
        assert [m.payload for m in got] == [b"1", b"2", b"3", b"4"]
        await sub.aclose()


async def test_unacked_messages_come_back_after_a_cut_and_late_acks_are_harmless(
    proxy: FaultProxy, broker_target: str
) -> None:
    async with AsyncClient(proxy.target, retry=FAST) as client, AsyncClient(broker_target) as direct:
        sub = client.subscribe("redeliver", max_in_flight=10)
        await sub.open()
        await direct.publish_many("redeliver", [b"1", b"2"])
        first = await take(sub, 2, timeout=5)  # held, not acked
        proxy.cut()
        again = await take(sub, 2, timeout=10)
        assert sorted((m.payload, m.attempt) for m in again) == [(b"1", 2), (b"2", 2)]
        for m in first:  # from the dead stream: harmless no-ops
            await m.ack()
            await m.nack()
        for m in again:
            await m.ack()
        await direct.publish("redeliver", b"3")
        (m3,) = await take(sub, 1, timeout=5)
        assert (m3.payload, m3.attempt) == (b"3", 1)  # 1 and 2 were acked for good
        await m3.ack()
        await sub.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("pushchannel-")]


async def test_blocking_subscription_rides_out_cuts(proxy: FaultProxy, broker_target: str) -> None:
    n = 300
    got: set[bytes] = set()
    failures: list[BaseException] = []

    def consume(sub: pushchannel.BlockingSubscription) -> None:
        try:
            for m in sub:  # never raises for a transient fault
                got.add(m.payload)
                m.ack()
                if len(got) == n:
                    return
        except BaseException as e:
            failures.append(e)

    changes: list[StateChange] = []
    client = pushchannel.Client(proxy.target, retry=FAST, on_state_change=changes.append)
    try:
        sub = client.subscribe("blocking-cuts")
        await asyncio.to_thread(sub.open)
        reader = asyncio.create_task(asyncio.to_thread(consume, sub))
        async with AsyncClient(broker_target) as direct:
            for i in range(0, n, 30):
                await direct.publish_many("blocking-cuts", [f"b{j}".encode() for j in range(i, i + 30)])
                if i % 90 == 0:
                    proxy.cut()
                await asyncio.sleep(0.1)
            await asyncio.wait_for(reader, 30)
    finally:
        await asyncio.to_thread(client.close)
    assert not failures
    assert got == {f"b{j}".encode() for j in range(n)}
    assert sum(c.state is S.RECONNECTING for c in changes) >= 2


async def test_a_stalled_event_loop_is_not_taken_for_a_dead_broker(broker_target: str) -> None:
    changes: list[StateChange] = []
    async with AsyncClient(broker_target, retry=FAST, on_state_change=changes.append) as client:
        sub = client.subscribe("stall")
        await sub.open()
        time.sleep(6 * HEARTBEAT)  # noqa: ASYNC251 -- the point: nothing on this loop runs
        await asyncio.sleep(4 * HEARTBEAT)
        await client.publish("stall", b"still here")
        (m,) = await take(sub, 1, timeout=5)
        await m.ack()
        await sub.aclose()
    assert [c.state for c in changes] == [S.CONNECTING, S.READY, S.CLOSED]
