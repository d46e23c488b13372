"""seed_stream and blocking_seed_stream: the seed's PushMessageStream loop, reconnecting."""

from __future__ import annotations

import asyncio
import threading

import pytest

import pushchannel
from pushchannel import AsyncClient, ConnectionState, RetryPolicy, StateChange
from pushchannel._proto import push_pb2
from pushchannel.client import SeedStream, blocking_seed_stream, seed_stream
from tests.faults.conftest import eventually
from tests.faults.proxy import FaultProxy

S = ConnectionState
FAST = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, attempt_timeout=3.0)


def state_of(stream: SeedStream) -> ConnectionState:
    return stream.state  # read through a call: mypy would keep an earlier check's narrowing


async def test_seed_stream_survives_a_cut(proxy: FaultProxy, broker_target: str) -> None:
    changes: list[StateChange] = []
    async with (
        AsyncClient(broker_target) as direct,
        seed_stream(proxy.target, "seed.hosts", retry=FAST, on_state_change=changes.append) as replies,
    ):
        await direct.publish("seed.hosts", "first")
        async with asyncio.timeout(5):
            reply = await anext(replies)
        assert isinstance(reply, push_pb2.MessageReply) and reply.message == "first"
        assert replies.state is S.READY

        proxy.cut()
        await eventually(lambda: any(c.state is S.RECONNECTING for c in changes), 5, "a reconnect")
        await eventually(lambda: replies.state is S.READY, 5, "ready again")
        await asyncio.sleep(0.2)  # the new stream is the group's consumer before we publish
        await direct.publish_many("seed.hosts", ["second", "third"])
        async with asyncio.timeout(5):
            later = [(await anext(replies)).message for _ in range(2)]
        assert later == ["second", "third"]
    assert state_of(replies) is S.CLOSED
    names = [c.state.name for c in changes]
    assert names[:2] == ["CONNECTING", "READY"] and names[-1] == "CLOSED"


async def test_seed_stream_raises_what_cannot_be_retried(broker_target: str) -> None:
    async with seed_stream(broker_target, "bad channel!", retry=FAST) as replies:
        with pytest.raises(pushchannel.InvalidArgument):
            async with asyncio.timeout(5):
                await anext(replies)
        with pytest.raises(StopAsyncIteration):
            await anext(replies)


async def test_seed_stream_waits_for_a_broker_that_comes_later(proxy: FaultProxy, broker_target: str) -> None:
    await proxy.refuse()
    changes: list[StateChange] = []
    async with (
        AsyncClient(broker_target) as direct,
        seed_stream(proxy.target, "seed.later", retry=FAST, on_state_change=changes.append) as replies,
    ):
        first = asyncio.create_task(anext(replies))
        await eventually(lambda: sum(c.state is S.RECONNECTING for c in changes) >= 2, 10, "retries")
        await proxy.refuse(False)
        await eventually(lambda: replies.state is S.READY, 10, "ready")
        await asyncio.sleep(0.2)
        await direct.publish("seed.later", "hello")
        assert (await asyncio.wait_for(first, 5)).message == "hello"


def test_blocking_seed_stream(broker_process: str) -> None:
    changes: list[StateChange] = []
    got: list[str] = []
    with (
        pushchannel.Client(broker_process) as client,
        blocking_seed_stream(broker_process, "seed.blocking", on_state_change=changes.append) as replies,
    ):
        client.publish_many("seed.blocking", ["a", "b", "c"])

        def read() -> None:
            for reply in replies:
                got.append(reply.message)
                if len(got) == 3:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
    assert got == ["a", "b", "c"]
    assert replies.state is S.CLOSED
    assert [c.state for c in changes] == [S.CONNECTING, S.READY, S.CLOSED]
    assert list(replies) == []  # closed: iteration ends


def test_blocking_seed_stream_close_from_another_thread(broker_process: str) -> None:
    replies = blocking_seed_stream(broker_process, "seed.idle")
    ended = threading.Event()

    def read() -> None:
        list(replies)
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    assert not ended.wait(0.3)
    replies.close()
    assert ended.wait(5)
    replies.close()  # idempotent
