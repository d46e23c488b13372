"""The SDK against a scripted broker that fails on purpose in ways a real one rarely does on cue:
streams CANCELLED or ended before they open (a reconnect storm), publishes answered UNAVAILABLE
or not at all, and failures that must not be retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

import pushchannel
from pushchannel import AsyncClient, ConnectionState, OutgoingMessage, RetryPolicy, StateChange
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from tests.faults.conftest import eventually

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, attempt_timeout=0.5)


@pytest.fixture
def broker_store_url() -> str:
    return "unused"  # no real broker here


class ScriptedBroker:
    """Answers Publish and Subscribe from a script: a list of what to do with each call."""

    def __init__(self) -> None:
        self.publish_script: list[str] = []  # "ok", "unavailable", "hang", "invalid"
        self.subscribe_script: list[str] = []  # "ok", "cancelled", "eof", "silent"
        self.publish_ids: list[list[str]] = []
        self.subscribe_calls = 0

    async def publish(self, request: pb.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.publish_ids.append([m.id for m in request.messages])
        step = self.publish_script.pop(0) if self.publish_script else "ok"
        if step == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "store unavailable")
        if step == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "payload too large")
        if step == "hang":
            await asyncio.sleep(30)
        return pb.PublishResponse(results=[pb.PublishResult(seq=i + 1) for i in range(len(request.messages))])

    async def subscribe(
        self, requests: AsyncIterator[pb.SubscribeRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        self.subscribe_calls += 1
        step = self.subscribe_script.pop(0) if self.subscribe_script else "ok"
        first = await anext(aiter(requests))
        if step == "cancelled":
            await context.abort(grpc.StatusCode.CANCELLED, "")
        if step == "eof":
            return
        if step == "silent":  # promises a heartbeat every 0.2 s, then sends nothing
            yield pb.SubscribeResponse(
                opened=pb.Opened(channel=first.open.channel, heartbeat_interval_ms=200)
            )
            await asyncio.sleep(30)
        yield pb.SubscribeResponse(opened=pb.Opened(channel=first.open.channel, group="default"))
        delivery = pb.Delivery(
            channel=first.open.channel, seq=1, id="x", payload=b"hi", attempt=1, delivery_tag=1
        )
        yield pb.SubscribeResponse(deliveries=pb.DeliveryBatch(deliveries=[delivery]))
        await asyncio.sleep(30)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedBroker, str]]:
    broker = ScriptedBroker()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Publish": grpc.unary_unary_rpc_method_handler(
            broker.publish,
            request_deserializer=pb.PublishRequest.FromString,
            response_serializer=pb.PublishResponse.SerializeToString,
        ),
        "Subscribe": grpc.stream_stream_rpc_method_handler(
            broker.subscribe,
            request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=pb.SubscribeResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pushchannel.v1.Broker", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield broker, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_streams_that_end_before_they_open_are_retried(scripted: tuple[ScriptedBroker, str]) -> None:
    broker, target = scripted
    broker.subscribe_script = ["cancelled", "eof", "cancelled", "ok"]
    changes: list[StateChange] = []
    async with AsyncClient(target, retry=FAST, on_state_change=changes.append) as client:
        sub = client.subscribe("storm")
        async with asyncio.timeout(5):
            m = await anext(sub)
        assert m.payload == b"hi"
        await sub.aclose()
    assert broker.subscribe_calls == 4
    retries = [c for c in changes if c.state is ConnectionState.RECONNECTING]
    assert [c.attempt for c in retries] == [1, 2, 3]
    assert isinstance(retries[0].error, pushchannel.Cancelled)
    assert isinstance(retries[1].error, pushchannel.Unavailable)  # ended (OK) before Opened


async def test_publish_retries_with_the_same_ids(scripted: tuple[ScriptedBroker, str]) -> None:
    broker, target = scripted
    broker.publish_script = ["unavailable", "hang", "unavailable", "ok"]
    async with AsyncClient(target, retry=FAST) as client:
        results = await asyncio.wait_for(
            client.publish_many("jobs", [b"a", OutgoingMessage(b"b", id="mine")]), 10
        )
    assert len(results) == 2
    assert len(broker.publish_ids) == 4  # the hung attempt timed out after attempt_timeout
    first = broker.publish_ids[0]
    assert first[1] == "mine" and len(first[0]) == 32  # one made up by the client
    assert all(ids == first for ids in broker.publish_ids)


async def test_publish_that_cannot_succeed_raises_at_once(scripted: tuple[ScriptedBroker, str]) -> None:
    broker, target = scripted
    broker.publish_script = ["invalid"]
    async with AsyncClient(target, retry=FAST) as client:
        with pytest.raises(pushchannel.InvalidArgument, match="payload too large"):
            await client.publish("jobs", b"x")
    assert len(broker.publish_ids) == 1


async def test_publish_deadline(scripted: tuple[ScriptedBroker, str]) -> None:
    broker, target = scripted
    broker.publish_script = ["unavailable"] * 1000
    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=0.3)
    async with AsyncClient(target, retry=retry) as client:
        with pytest.raises(pushchannel.Unavailable, match="gave up after"):
            await asyncio.wait_for(client.publish("jobs", b"x"), 5)
    assert 2 < len(broker.publish_ids) < 200


async def test_a_connection_found_dead_is_replaced_under_every_call(
    scripted: tuple[ScriptedBroker, str],
) -> None:
    broker, target = scripted
    broker.subscribe_script = ["silent"]  # then "ok": opened, one delivery, no heartbeats
    broker.publish_script = ["hang"]  # then "ok"
    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, attempt_timeout=20)
    changes: list[StateChange] = []
    async with AsyncClient(target, retry=retry) as client:
        watcher = client.subscribe("a", group="watcher")
        await watcher.open()
        other = client.subscribe("b")
        other.on_state_change(changes.append)
        await other.open()
        started = time.monotonic()
        # The publish hangs, the other stream expects no heartbeat: only the watcher notices
        # the silence (0.6 s), and replacing the channel must end both calls as retryable.
        result = await asyncio.wait_for(client.publish("c", b"x"), 5)
        assert result.seq == 1 and len(broker.publish_ids) == 2
        assert time.monotonic() - started < 3
        await eventually(
            lambda: any(c.state is ConnectionState.RECONNECTING for c in changes), 5, "reconnect"
        )
        gone = next(c for c in changes if c.state is ConnectionState.RECONNECTING)
        assert isinstance(gone.error, pushchannel.Cancelled)
        await watcher.aclose()
        await other.aclose()
