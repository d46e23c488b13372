"""Fixtures for the Redis store's own tests: real redis-server processes and real broker
processes (``python -m pushchannel.cli serve --store redis://...``), raw gRPC clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import ROOT, wait_for_port
from tests.redis_server import LocalCluster, RedisServer, free_port, require_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (in memory), stopped after it."""
    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-node Redis Cluster (no replicas) on loopback for this module."""
    require_redis(cli=True)
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class BrokerNode:
    """A `pushchannel serve` subprocess; its log goes to a file (read it when a test fails)."""

    def __init__(self, store_url: str, directory: Path, name: str, *extra: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", self.target,
             "--store", store_url, "--heartbeat", "0.5", *extra],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port(self.port, self.proc)
        except Exception:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"broker {name} did not start: {self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[object]:
    """``start_node(store_url, name)``: a broker process, stopped after the test."""
    nodes: list[BrokerNode] = []

    def start(store_url: str, name: str, *extra: str) -> BrokerNode:
        node = BrokerNode(store_url, tmp_path, name, *extra)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


class RawSubscriber:
    """A Subscribe stream over plain gRPC stubs: every frame is visible (heartbeats too), and
    nothing retries behind the test's back."""

    def __init__(self, target: str, channel: str, *, group: str = "", ack_deadline_ms: int = 30_000,
                 max_in_flight: int = 100) -> None:  # fmt: skip
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.BrokerStub(self.channel)  # type: ignore[no-untyped-call]
        self._requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self._requests.put_nowait(
            pb.SubscribeRequest(
                open=pb.Open(
                    channel=channel, group=group, ack_deadline_ms=ack_deadline_ms, max_in_flight=max_in_flight
                )
            )
        )
        self.call = self.stub.Subscribe(self._gen())
        self.heartbeats = 0
        self.ended: grpc.StatusCode | None = None
        # Reads run in a task of their own: cancelling a pending read would cancel the call.
        self._frames: asyncio.Queue[pb.SubscribeResponse] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _gen(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def _read(self) -> None:
        try:
            async for response in self.call:
                if response.WhichOneof("kind") == "heartbeat":
                    self.heartbeats += 1
                else:
                    self._frames.put_nowait(response)
        except grpc.aio.AioRpcError as e:
            self.ended = e.code()
        else:
            self.ended = grpc.StatusCode.OK

    async def _next(self, timeout: float) -> pb.SubscribeResponse:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return self._frames.get_nowait()
                except asyncio.QueueEmpty:
                    if self.ended is not None:
                        raise AssertionError(f"the stream ended: {self.ended}") from None
                await asyncio.sleep(0.01)

    async def opened(self, timeout: float = 10.0) -> pb.Opened:
        response = await self._next(timeout)
        assert response.WhichOneof("kind") == "opened", response
        return response.opened

    async def deliveries(self, timeout: float) -> list[pb.Delivery]:
        """The next batch of deliveries (heartbeats are counted, not returned)."""
        response = await self._next(timeout)
        assert response.WhichOneof("kind") == "deliveries", response
        return list(response.deliveries.deliveries)

    async def collect(self, n: int, timeout: float) -> list[pb.Delivery]:
        got: list[pb.Delivery] = []
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got += await self.deliveries(timeout)
        return got

    def ack(self, deliveries: list[pb.Delivery]) -> None:
        self._requests.put_nowait(
            pb.SubscribeRequest(ack=pb.Ack(delivery_tags=[d.delivery_tag for d in deliveries]))
        )

    def nack(self, deliveries: list[pb.Delivery], reason: str = "") -> None:
        tags = [d.delivery_tag for d in deliveries]
        self._requests.put_nowait(pb.SubscribeRequest(nack=pb.Nack(delivery_tags=tags, reason=reason)))

    async def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close(None)


async def publish(target: str, channel: str, *payloads: bytes, timeout: float = 10.0) -> list[int]:
    """One Publish call over a plain stub: the seqs."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.BrokerStub(ch)  # type: ignore[no-untyped-call]
        response = await stub.Publish(
            pb.PublishRequest(channel=channel, messages=[pb.Message(payload=p) for p in payloads]),
            timeout=timeout,
        )
    return [r.seq for r in response.results]
