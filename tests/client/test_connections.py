"""A client's subscriptions spread over connections (``streams_per_connection``), against a real
in-process broker that takes at most 8 streams at once on one connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from pushchannel import AsyncClient, Client, InvalidArgument, Subscription
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from pushchannel.server.app import RunningServer, ServerConfig, start_server
from tests.conftest import TEST_BROKER

WAIT = 10.0  # seconds any single expected event may take


@pytest.fixture
async def capped() -> AsyncIterator[RunningServer]:
    """A broker that holds back the ninth stream on a connection (HTTP/2 SETTINGS)."""
    config = ServerConfig(
        listen="127.0.0.1:0", store_url="memory://", broker=TEST_BROKER, grace=0.2, max_concurrent_streams=8
    )
    server = await start_server(config)
    try:
        yield server
    finally:
        await server.stop(0.2)


async def peers(target: str, channel: str) -> list[str]:
    """The client address (one per connection) of each consumer the broker has on ``channel``."""
    async with grpc.aio.insecure_channel(target) as ch:
        info = await broker_pb2_grpc.BrokerStub(ch).GetChannel(  # type: ignore[no-untyped-call]
            pb.GetChannelRequest(channel=channel), timeout=WAIT
        )
    return [c.peer for c in info.consumers]


async def settled_peers(target: str, channel: str, consumers: int) -> list[str]:
    """``peers`` once the broker counts ``consumers`` of them (closes are seen asynchronously)."""
    for _ in range(200):  # 10 s
        found = await peers(target, channel)
        if len(found) == consumers:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"the broker counts {len(found)} consumers of {channel}, not {consumers}")


async def first_message(sub: Subscription) -> bytes:
    async for message in sub:
        await message.ack()
        return message.payload
    raise AssertionError("the subscription ended without a message")


async def test_subscriptions_past_the_brokers_cap_open_on_more_connections(capped: RunningServer) -> None:
    """12 subscriptions on a broker that takes 8 a connection: with 5 a connection the client
    opens 3 connections and every subscription is served; emptying one connection closes it,
    and new subscriptions fill the room left on the others before a connection is made."""
    async with AsyncClient(capped.target, streams_per_connection=5) as client:
        subs = [client.subscribe("gw", group=f"g{i}") for i in range(12)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(s.open() for s in subs))
        found = await settled_peers(capped.target, "gw", 12)
        assert sorted(found.count(p) for p in set(found)) == [2, 5, 5]
        assert client._connections.connections == 3

        await client.publish("gw", b"to every group")
        async with asyncio.timeout(WAIT):
            assert await asyncio.gather(*(first_message(s) for s in subs)) == [b"to every group"] * 12

        # The second connection carries g5..g9: closing them closes it.
        for s in subs[5:10]:
            await s.aclose()
        assert client._connections.connections == 2
        found = await settled_peers(capped.target, "gw", 7)
        assert sorted(found.count(p) for p in set(found)) == [2, 5]

        # Three more fit on the third connection (2 of 5 taken): no new connection.
        more = [client.subscribe("gw", group=f"h{i}") for i in range(3)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(s.open() for s in more))
        found = await settled_peers(capped.target, "gw", 10)
        assert sorted(found.count(p) for p in set(found)) == [5, 5]
        assert client._connections.connections == 2
    assert client._connections.connections == 0


async def test_one_connection_holds_back_what_is_over_the_cap(capped: RunningServer) -> None:
    """Why the option exists: with every subscription on one connection (a cap above the
    broker's), the broker holds back the ninth and later streams, which never open."""
    async with AsyncClient(capped.target, streams_per_connection=1000) as client:
        subs = [client.subscribe("gw", group=f"g{i}") for i in range(12)]
        opens = [asyncio.ensure_future(s.open()) for s in subs]
        done, pending = await asyncio.wait(opens, timeout=3)
        assert (len(done), len(pending)) == (8, 4)
        for s in subs:
            await s.aclose()
        await asyncio.wait(pending)
        for f in pending:
            f.exception()  # the close ended the wait: retrieved, not logged as lost


def test_the_blocking_client_takes_the_option() -> None:
    """``Client`` hands ``streams_per_connection`` to the AsyncClient it runs (nothing is
    connected before a call)."""
    with Client("127.0.0.1:1", streams_per_connection=7) as client:
        assert client._aio._connections.per_connection == 7
    with pytest.raises(ValueError, match="streams_per_connection must be at least 1"):
        AsyncClient("127.0.0.1:1", streams_per_connection=0)


async def test_a_subscription_that_failed_for_good_gives_its_place_back(capped: RunningServer) -> None:
    """A subscription the broker refuses (a bad channel name) ends, and its connection, a
    second one here, is closed with it."""
    async with AsyncClient(capped.target, streams_per_connection=1) as client:
        first = client.subscribe("gw", group="a")
        await first.open()
        refused = client.subscribe("no spaces allowed")
        with pytest.raises(InvalidArgument):
            await refused.open()
        assert client._connections.connections == 1
        again = client.subscribe("gw", group="b")  # the place is free again: a second connection
        await again.open()
        assert client._connections.connections == 2
