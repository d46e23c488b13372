"""Lease extension: a message the application holds is not delivered again until max_lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from pushchannel import AsyncClient, Client
from pushchannel.client._settle import Leases, extension_requests
from pushchannel.server.app import RunningServer


@pytest.fixture
async def client(broker_target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(broker_target) as c:
        yield c


async def test_a_held_message_is_extended_not_redelivered(
    client: AsyncClient, broker_server: RunningServer
) -> None:
    stats = broker_server.broker.stats
    await client.publish("long-task", b"work")
    sub = client.subscribe("long-task", ack_deadline=1.0)
    async with asyncio.timeout(5):
        m = await anext(sub)
    other = client.subscribe("long-task")  # a competing consumer of the same group
    await other.open()
    # The handler holds it for three deadlines; nobody may get it again meanwhile.
    seen_again = asyncio.gather(
        asyncio.wait_for(anext(sub), 3.0), asyncio.wait_for(anext(other), 3.0), return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in await seen_again)
    assert m.attempt == 1 and stats.redelivered == 0
    acked_before = stats.acked
    await m.ack()
    await asyncio.sleep(1.5)  # past another deadline: still nothing
    assert stats.acked == acked_before + 1 and stats.redelivered == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(other), 0.5)
    await sub.aclose()
    await other.aclose()


async def test_past_max_lease_the_message_is_let_go(client: AsyncClient) -> None:
    await client.publish("too-long", b"work")
    sub = client.subscribe("too-long", ack_deadline=1.0, max_lease=1.5)
    async with asyncio.timeout(5):
        m = await anext(sub)
    held_since = time.monotonic()
    async with asyncio.timeout(6):
        again = await anext(sub)  # while the handler still holds the first delivery
    held = time.monotonic() - held_since
    assert (again.seq, again.attempt) == (m.seq, 2)
    assert 1.4 <= held <= 4.0, held
    await again.ack()
    await m.ack()  # late and harmless
    await sub.aclose()


def test_blocking_client_extends_leases_too(broker_process: str) -> None:
    with Client(broker_process) as client:
        client.publish("blocking-lease", b"work")
        with client.subscribe("blocking-lease", ack_deadline=1.0) as sub:
            m = next(iter(sub))
            time.sleep(2.5)  # held in the application thread
            m.ack()
        client.publish("blocking-lease", b"next")
        with client.subscribe("blocking-lease") as sub:
            n = next(iter(sub))
            assert (n.payload, n.attempt) == (b"next", 1)  # the first one was not redelivered
            n.ack()


def test_leases_bookkeeping() -> None:
    leases = Leases(ack_deadline=6.0, max_lease=20.0)
    assert leases.period == 1.0
    leases.add([1, 2], now=0.0)
    assert leases.due(2.9) == {}
    assert leases.due(3.0) == {6000: [1, 2]}  # half the deadline: extend by a full one
    assert leases.due(4.0) == {}  # just extended
    leases.discard([2])  # settled
    assert leases.due(6.0) == {6000: [1]}
    assert leases.due(12.0) == {6000: [1]}
    assert leases.due(15.0) == {5000: [1]}  # capped: no lease past max_lease from arrival
    assert leases.due(20.0) == {}  # let go
    assert len(leases) == 0
    (request,) = extension_requests({500: [1, 2, 3]})
    assert list(request.modify_deadline.delivery_tags) == [1, 2, 3]
    assert request.modify_deadline.deadline_ms == 500
    assert len(extension_requests({500: list(range(25))}, max_tags=10)) == 3
