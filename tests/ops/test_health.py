"""The standard gRPC health service and server reflection, through the stock stubs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pushchannel.server.app import RunningServer, ServerConfig, start_server
from pushchannel.server.health import Health
from tests.conftest import TEST_BROKER
from tests.server.helpers import STEP, Subscriber, eventually

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OWN = ("", "pushchannel.v1.Broker", "MessageSync")


@pytest.fixture
async def running() -> AsyncIterator[RunningServer]:
    server = await start_server(
        ServerConfig(listen="127.0.0.1:0", store_url="memory://", broker=TEST_BROKER, grace=1.0)
    )
    try:
        yield server
    finally:
        await server.stop(0.5)


async def _check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=STEP)
    status: int = resp.status
    return status


async def test_serving_for_the_server_and_each_service(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        for service in OWN:
            assert await _check(channel, service) == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(channel, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_not_serving_while_draining(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), STEP)
        assert first.status == SERVING
        async with Subscriber(channel) as sub:
            await sub.open("h.drain")
            stopping = asyncio.get_running_loop().create_task(running.stop(1.0))
            second = await asyncio.wait_for(watch.read(), STEP)
            assert second.status == NOT_SERVING
            err = await sub.wait_ended()
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
            # New calls are refused once the drain began.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _check(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            watch.cancel()
            await asyncio.wait_for(stopping, STEP)


async def test_not_serving_while_the_store_probe_fails() -> None:
    """A real gRPC server with the health service; the probe stands in for a store."""
    store_up = True

    async def probe() -> None:
        if not store_up:
            raise OSError("store unreachable")

    health = Health(probe, interval=0.02, timeout=1.0)
    server = grpc.aio.server()
    health.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def status_is(expected: int) -> bool:
                return all([await _check(channel, s) == expected for s in OWN])

            assert await status_is(SERVING)
            store_up = False
            await eventually(lambda: status_is(NOT_SERVING))
            store_up = True
            await eventually(lambda: status_is(SERVING))
            await health.drain()
            store_up = True
            await asyncio.sleep(0.1)
            assert await status_is(NOT_SERVING)  # draining is for good
    finally:
        await health.drain()
        await server.stop(None)


async def test_a_probe_that_hangs_counts_as_down() -> None:
    async def probe() -> None:
        await asyncio.sleep(10)

    health = Health(probe, timeout=0.05)
    assert await health.check() is False


async def test_reflection_lists_every_service(running: RunningServer) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask(**fields: str) -> reflection_pb2.ServerReflectionResponse:
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**fields)]))
            responses = [r async for r in call]
            assert len(responses) == 1
            return responses[0]

        listed = await asyncio.wait_for(ask(list_services=""), STEP)
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "pushchannel.v1.Broker",
            "MessageSync",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        # Tools such as grpcurl then fetch the schema of each service.
        for symbol in ("pushchannel.v1.Broker", "MessageSync"):
            found = await asyncio.wait_for(ask(file_containing_symbol=symbol), STEP)
            assert found.WhichOneof("message_response") == "file_descriptor_response", symbol
            assert found.file_descriptor_response.file_descriptor_proto
