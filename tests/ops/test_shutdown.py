"""SIGTERM while publishers and a consumer are busy: health goes NOT_SERVING, the consumer is
told to reconnect, the broker exits 0 within its grace period, and every publish it answered
is in the SQLite file when a new broker opens it; the publishers move on to the new broker."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from tests.conftest import start_broker_process, stop_process
from tests.server.helpers import STEP, Subscriber, lost_write, stub

pytestmark = pytest.mark.timeout(120)

GRACE = 5.0
PUBLISHERS = 4
BATCH = 20
CH = "load.hosts"


class Publisher:
    """Publishes batches with ids until the broker refuses one; remembers what was answered."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.acked: set[str] = set()
        self.unanswered: list[pb.Message] = []  # the batch in the air when the broker left
        self.batches = 0

    async def run(self, target: str, stop_after: float) -> None:
        deadline = time.monotonic() + stop_after
        async with grpc.aio.insecure_channel(target) as channel:
            broker = stub(channel)
            while time.monotonic() < deadline:
                ids = [f"p{self.k}-{self.batches}-{j}" for j in range(BATCH)]
                batch = [pb.Message(id=i, payload=i.encode()) for i in ids]
                try:
                    await broker.Publish(pb.PublishRequest(channel=CH, messages=batch), timeout=STEP)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    self.unanswered = batch
                    return  # move on: this broker is going away
                self.acked.update(ids)
                self.batches += 1


async def _health_watch(target: str, seen: list[int]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for resp in call:
                seen.append(resp.status)
        except grpc.aio.AioRpcError:
            pass  # the broker ended the call when it stopped


async def _read_all(target: str, group: str, expected: int) -> set[str]:
    """The ids of every stored message, read by a durable group from the start."""
    got: set[str] = set()
    async with grpc.aio.insecure_channel(target) as channel, Subscriber(channel, ack_on_receipt=True) as sub:
        await sub.open(CH, group=group, position=pb.Open.EARLIEST, max_in_flight=1000)
        deadline = time.monotonic() + 30
        while len(got) < expected and time.monotonic() < deadline:
            got.update(d.id for d in await sub.collect_for(0.5))
    return got


async def test_sigterm_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/broker.db"
    proc, target = start_broker_process("--store", db, "--grace", str(GRACE), "--heartbeat", "0.5")
    try:
        # A durable group nobody reads keeps every message stored, so the file can be audited.
        async with grpc.aio.insecure_channel(target) as channel, Subscriber(channel) as audit:
            await audit.open(CH, group="audit", position=pb.Open.EARLIEST)

        health_seen: list[int] = []
        watcher = asyncio.get_running_loop().create_task(_health_watch(target, health_seen))
        consumed: set[str] = set()
        async with (
            grpc.aio.insecure_channel(target) as channel,
            Subscriber(channel, ack_on_receipt=True) as sub,
            Subscriber(channel) as quiet,
        ):
            await sub.open(CH, max_in_flight=500)
            # A host on a channel nobody publishes to writes nothing after Open, so gRPC can
            # show it the broker's own answer: a busy consumer's ack may be in the air as the
            # stream ends, and then gRPC reports that failed write instead (lost_write).
            await quiet.open("idle.hosts")
            publishers = [Publisher(k) for k in range(PUBLISHERS)]
            tasks = [asyncio.get_running_loop().create_task(p.run(target, 60.0)) for p in publishers]

            async def enough() -> bool:
                return sum(len(p.acked) for p in publishers) >= 2000 and len(sub.received) > 0

            deadline = time.monotonic() + 30
            while not await enough():
                assert time.monotonic() < deadline, "the load never got going"
                await asyncio.sleep(0.05)

            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            err = await quiet.wait_ended(GRACE + STEP)
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
            err = await sub.wait_ended(STEP)
            assert err is not None and (err.code() == grpc.StatusCode.UNAVAILABLE or lost_write(err)), err
            consumed.update(d.id for d in sub.received)
            await asyncio.wait_for(asyncio.gather(*tasks), GRACE + STEP)
        code = await asyncio.to_thread(proc.wait, GRACE + STEP)
        elapsed = time.monotonic() - t0
        assert code == 0
        # Nothing holds the drain (health watches end too), so well within the grace period.
        assert elapsed < GRACE, f"took {elapsed:.1f} s to stop with a {GRACE} s grace"
        await asyncio.wait_for(watcher, STEP)
        assert health_seen[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in health_seen, health_seen
        assert all(p.unanswered for p in publishers), "a publisher was never refused"
        acked = set().union(*(p.acked for p in publishers))
        assert consumed  # the consumer was busy too
    finally:
        stop_process(proc)

    # A new broker on the same file: the publishers move on to it and retry with the same ids.
    proc, target = start_broker_process("--store", db, "--grace", str(GRACE))
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            broker = stub(channel)
            for p in publishers:
                resp = await broker.Publish(
                    pb.PublishRequest(channel=CH, messages=p.unanswered), timeout=STEP
                )
                p.acked.update(m.id for m in p.unanswered)
                assert len(resp.results) == BATCH
        everything = set().union(*(p.acked for p in publishers))
        stored = await _read_all(target, "audit", len(everything))
        lost = acked - stored
        assert not lost, f"{len(lost)} acknowledged messages are missing, e.g. {sorted(lost)[:5]}"
        assert everything <= stored
    finally:
        stop_process(proc)
