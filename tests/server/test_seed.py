"""The seed's ``MessageSync`` clients work unchanged: stubs are generated here, inside the test,
from the proto text of SPEC §2.1 (not from the project's modules), and talk to a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_tools import protoc  # type: ignore[import-untyped]

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.app import RunningServer

from ..conftest import start_broker_process, stop_process
from .helpers import STEP, consumer_count, eventually, stub

pytestmark = pytest.mark.timeout(60)

SEED_PROTO = """\
syntax = "proto3";
service MessageSync {
  rpc SubmitMessage (SubmitRequest) returns (SubmitReply) {}
  rpc PushMessageStream (ConnRequest) returns (stream MessageReply) {}
}
message SubmitRequest { string channel = 1; string message = 2; }
message SubmitReply   { string reply = 1; }
message ConnRequest   { string channel = 1; }
message MessageReply  { string message = 1; }
"""


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """``push_pb2`` and ``push_pb2_grpc`` as a seed client would generate them."""
    out: Path = tmp_path_factory.mktemp("seed_stubs")
    (out / "push.proto").write_text(SEED_PROTO)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{out}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(out / "push.proto"),
        ]
    )
    assert rc == 0, "protoc failed on the seed proto"
    saved: dict[str, ModuleType] = {
        name: sys.modules.pop(name) for name in ("push_pb2", "push_pb2_grpc") if name in sys.modules
    }
    sys.path.insert(0, str(out))
    try:
        pb2: ModuleType = importlib.import_module("push_pb2")
        pb2_grpc: ModuleType = importlib.import_module("push_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    assert Path(pb2.__file__ or "").parent == out  # not the project's modules
    try:
        yield SimpleNamespace(pb2=pb2, grpc=pb2_grpc)
    finally:
        for name in ("push_pb2", "push_pb2_grpc"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


class SeedConsumer:
    """A seed host: one PushMessageStream, every message read into a list."""

    def __init__(self, seed: SimpleNamespace, channel: grpc.aio.Channel, name: str) -> None:
        self.call = seed.grpc.MessageSyncStub(channel).PushMessageStream(seed.pb2.ConnRequest(channel=name))
        self.messages: list[str] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for reply in self.call:
                self.messages.append(reply.message)
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def _submit(seed: SimpleNamespace, channel: grpc.aio.Channel, name: str, message: str) -> Any:
    return await seed.grpc.MessageSyncStub(channel).SubmitMessage(
        seed.pb2.SubmitRequest(channel=name, message=message), timeout=STEP
    )


async def _until(check: Any, timeout: float = STEP) -> None:
    async def ok() -> bool:
        return bool(check())

    await eventually(ok, timeout=timeout)


async def test_submit_message_replies_received(seed: SimpleNamespace, grpc_channel: grpc.aio.Channel) -> None:
    reply = await _submit(seed, grpc_channel, "hosts.a", "hello")
    assert reply.reply == "received"
    assert type(reply).__module__ == "push_pb2"


async def test_three_consumers_two_producers_each_message_exactly_once_in_order(
    seed: SimpleNamespace, grpc_channel: grpc.aio.Channel
) -> None:
    name, per_producer = "hosts.fleet", 1500
    consumers = [SeedConsumer(seed, grpc_channel, name) for _ in range(3)]
    try:
        broker = stub(grpc_channel)

        async def all_connected() -> bool:
            return await consumer_count(broker, name) == 3

        await eventually(all_connected)

        async def produce(p: int) -> None:
            for k in range(per_producer):
                reply = await _submit(seed, grpc_channel, name, f"p{p}:{k}")
                assert reply.reply == "received"

        await asyncio.wait_for(asyncio.gather(produce(0), produce(1)), 30.0)
        total = 2 * per_producer
        await _until(lambda: sum(len(c.messages) for c in consumers) >= total, timeout=10.0)
        await asyncio.sleep(0.3)  # room for a duplicate to show up

        everything = [m for c in consumers for m in c.messages]
        assert len(everything) == total, "a message was delivered twice"
        assert set(everything) == {f"p{p}:{k}" for p in range(2) for k in range(per_producer)}
        for i, c in enumerate(consumers):
            assert c.messages, (
                f"consumer {i} got nothing: each message goes to one of the connected consumers"
            )
            assert c.error is None
            for p in range(2):
                ks = [int(m.split(":")[1]) for m in c.messages if m.startswith(f"p{p}:")]
                assert ks == sorted(ks), f"consumer {i} got producer {p}'s messages out of order"
    finally:
        for c in consumers:
            await c.close()


async def test_messages_submitted_before_any_consumer_are_delivered_in_fifo_order(
    seed: SimpleNamespace, grpc_channel: grpc.aio.Channel
) -> None:
    for k in range(20):
        await _submit(seed, grpc_channel, "hosts.offline", f"m{k}")
    consumer = SeedConsumer(seed, grpc_channel, "hosts.offline")
    try:
        await _until(lambda: len(consumer.messages) >= 20)
        await asyncio.sleep(0.1)
        assert consumer.messages == [f"m{k}" for k in range(20)]
    finally:
        await consumer.close()


async def test_several_messages_arriving_together_are_all_delivered(
    seed: SimpleNamespace, grpc_channel: grpc.aio.Channel
) -> None:
    consumer = SeedConsumer(seed, grpc_channel, "hosts.burst")
    try:
        await eventually(lambda: _connected(grpc_channel, "hosts.burst", 1))
        await asyncio.gather(*(_submit(seed, grpc_channel, "hosts.burst", f"b{k}") for k in range(200)))
        await _until(lambda: len(consumer.messages) >= 200)
        await asyncio.sleep(0.1)
        assert sorted(consumer.messages) == sorted(f"b{k}" for k in range(200))
    finally:
        await consumer.close()


async def test_a_message_written_to_a_stream_that_broke_is_not_lost(
    seed: SimpleNamespace, grpc_channel: grpc.aio.Channel, broker_server: RunningServer
) -> None:
    """A host that vanishes: what reached it was delivered; nothing else is lost."""
    name = "hosts.flaky"
    first = SeedConsumer(seed, grpc_channel, name)
    await eventually(lambda: _connected(grpc_channel, name, 1))
    await _submit(seed, grpc_channel, name, "one")
    await _until(lambda: first.messages == ["one"])
    await first.close()
    await eventually(lambda: _connected(grpc_channel, name, 0))
    await _submit(seed, grpc_channel, name, "two")
    second = SeedConsumer(seed, grpc_channel, name)
    try:
        await _until(lambda: second.messages == ["two"])
        await asyncio.sleep(0.2)
        assert second.messages == ["two"]  # "one" was written and counts as delivered
    finally:
        await second.close()


async def test_fifty_concurrent_streams_on_distinct_channels(
    seed: SimpleNamespace, grpc_channel: grpc.aio.Channel
) -> None:
    n = 60
    consumers = [SeedConsumer(seed, grpc_channel, f"hosts.h{i}") for i in range(n)]
    try:
        broker = stub(grpc_channel)

        async def all_connected() -> bool:
            resp = await broker.ListChannels(_list_req(), timeout=STEP)
            return sum(len(c.consumers) for c in resp.channels) == n

        await eventually(all_connected)
        await asyncio.gather(*(_submit(seed, grpc_channel, f"hosts.h{i}", f"for h{i}") for i in range(n)))
        await _until(lambda: all(c.messages for c in consumers))
        await asyncio.sleep(0.1)
        for i, c in enumerate(consumers):
            assert c.messages == [f"for h{i}"]
    finally:
        for c in consumers:
            await c.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_an_idle_broker_with_fifty_idle_seed_streams_uses_almost_no_cpu(seed: SimpleNamespace) -> None:
    proc, target = start_broker_process("--store", "memory://", "--heartbeat", "0.5")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            n = 50
            consumers = [SeedConsumer(seed, channel, f"idle.h{i}") for i in range(n)]
            try:
                broker = stub(channel)

                async def all_connected() -> bool:
                    resp = await broker.ListChannels(_list_req("idle."), timeout=STEP)
                    return sum(len(c.consumers) for c in resp.channels) == n

                await eventually(all_connected, timeout=10.0)
                await asyncio.sleep(0.5)  # let start-up work settle
                cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
                await asyncio.sleep(2.0)
                cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
                share = (cpu1 - cpu0) / (t1 - t0)
                assert share < 0.05, f"an idle broker used {share:.1%} of a core"

                # still alive and serving
                await _submit(seed, channel, "idle.h7", "wake up")
                await _until(lambda: consumers[7].messages == ["wake up"])
                assert all(c.error is None for c in consumers)
            finally:
                for c in consumers:
                    await c.close()
    finally:
        stop_process(proc)


def _list_req(prefix: str = "") -> pb.ListChannelsRequest:
    return pb.ListChannelsRequest(prefix=prefix)


async def _connected(channel: grpc.aio.Channel, name: str, n: int) -> bool:
    return await consumer_count(stub(channel), name) == n
