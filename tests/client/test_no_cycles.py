"""A closed client leaves no reference cycles behind: a process that opens and closes many
(hosts reconnecting through a gateway, the streams benchmark) would otherwise pile up garbage
that only the collector's full passes free, each a stall of seconds at a million objects."""

from __future__ import annotations

import asyncio
import gc

import pytest

from pushchannel import AsyncClient, Cancelled, Client
from pushchannel.client import seed_stream


def sdk_garbage() -> list[str]:
    """The SDK's objects among what only the cycle collector could free now; freed after."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = sorted(
            type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("pushchannel.client")
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    gc.collect()  # cleared from gc.garbage, a cycle is still a cycle: free it
    return found


async def test_an_async_client_that_published_and_subscribed(broker_process: str) -> None:
    sdk_garbage()  # what came before this test
    async with AsyncClient(broker_process) as client:
        await client.publish("gc.a", b"x")
        sub = client.subscribe("gc.a", max_in_flight=10)
        async with asyncio.timeout(5):
            async for message in sub:
                await message.ack()
                break
        await sub.aclose()
    del client, sub, message
    await asyncio.sleep(0.1)
    assert sdk_garbage() == []


async def test_a_subscription_closed_while_it_was_opening() -> None:
    """Nothing listens at the target, so the open waits (retrying) until the close ends it."""
    sdk_garbage()
    async with AsyncClient("127.0.0.1:1") as client:
        sub = client.subscribe("gc.opening")
        opening = asyncio.ensure_future(sub.open())
        await asyncio.sleep(0.2)
        await sub.aclose()
        with pytest.raises(Cancelled, match="closed while it was opening"):
            await opening
    del client, sub, opening
    await asyncio.sleep(0.1)
    assert sdk_garbage() == []


async def test_a_subscription_closed_with_its_client_while_streaming(broker_process: str) -> None:
    sdk_garbage()
    clients = [AsyncClient(broker_process) for _ in range(5)]
    subs = [c.subscribe(f"gc.b{i}") for i, c in enumerate(clients)]
    async with asyncio.timeout(10):
        await asyncio.gather(*(s.open() for s in subs))
    await asyncio.gather(*(c.close() for c in clients))
    del clients, subs
    await asyncio.sleep(0.1)
    assert sdk_garbage() == []


async def test_a_seed_stream(broker_process: str) -> None:
    sdk_garbage()
    async with AsyncClient(broker_process) as producer, seed_stream(broker_process, "gc.seed") as stream:
        # the stream must be running (its task started) before it is closed
        async with asyncio.timeout(10):
            while True:
                await producer.publish("gc.seed", b"m")
                try:
                    async with asyncio.timeout(0.5):
                        await anext(stream)
                    break
                except TimeoutError:
                    continue
    del producer, stream
    await asyncio.sleep(0.1)
    assert sdk_garbage() == []


def test_a_blocking_client(broker_process: str) -> None:
    sdk_garbage()
    with Client(broker_process) as client:
        client.publish("gc.c", b"y")
        with client.subscribe("gc.c", max_in_flight=10) as sub:
            for message in sub:
                message.ack()
                break
    del client, sub, message
    assert sdk_garbage() == []
