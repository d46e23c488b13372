"""A `pushchannel serve` subprocess on SQLite, restarted on the same port and file (SIGTERM and
kill -9) while a producer and a consumer run: nothing lost, nothing stored twice."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from pushchannel import AsyncClient, ConnectionState, RetryPolicy, StateChange
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from tests.conftest import free_port, start_broker_process, stop_process

N = 3000
BATCH = 10
RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=1.0, attempt_timeout=5.0)


@pytest.fixture
def broker_store_url() -> str:
    return "unused"  # this module starts its own brokers; no in-process one


async def channel_depth(target: str, channel: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        get_channel = ch.unary_unary(
            "/pushchannel.v1.Broker/GetChannel",
            request_serializer=pb.GetChannelRequest.SerializeToString,
            response_deserializer=pb.ChannelInfo.FromString,
        )
        info: pb.ChannelInfo = await get_channel(pb.GetChannelRequest(channel=channel), timeout=10)
        return info.depth


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
async def test_producer_and_consumer_ride_out_a_broker_restart(tmp_path: Path, how: str) -> None:
    port = free_port()
    args = ("--store", f"sqlite:///{tmp_path}/broker.db", "--heartbeat", "0.5")
    proc, target = await asyncio.to_thread(start_broker_process, *args, port=port)
    procs: list[subprocess.Popen[bytes]] = [proc]
    changes: list[StateChange] = []
    try:
        async with (
            AsyncClient(target, retry=RETRY) as producer,
            AsyncClient(target, retry=RETRY, on_state_change=changes.append) as consumer,
        ):
            # A durable group that never consumes keeps every stored message: the channel's
            # depth then counts what was stored, duplicates included.
            audit = consumer.subscribe("jobs", group="audit", start="earliest")
            await audit.open()
            await audit.aclose()

            sub = consumer.subscribe("jobs", max_in_flight=100)
            await sub.open()
            received: collections.Counter[bytes] = collections.Counter()
            seqs: dict[bytes, set[int]] = collections.defaultdict(set)
            halfway = asyncio.Event()

            async def produce() -> None:
                for start in range(0, N, BATCH):  # ids made by the client
                    batch = [f"job-{i}".encode() for i in range(start, start + BATCH)]
                    for payload, result in zip(
                        batch, await producer.publish_many("jobs", batch), strict=True
                    ):
                        seqs[payload].add(result.seq)
                    if start >= N // 3:
                        halfway.set()
                    await asyncio.sleep(0.002)

            async def consume() -> None:
                async for m in sub:
                    received[m.payload] += 1
                    await m.ack()
                    if len(received) == N:
                        return

            async def restart() -> None:
                await halfway.wait()
                old = procs[-1]
                if how == "sigterm":
                    old.terminate()
                else:
                    old.kill()
                await asyncio.to_thread(old.wait, 20)
                stop_process(old)
                await asyncio.sleep(0.5)  # down for a while: clients get refused
                new, _ = await asyncio.to_thread(start_broker_process, *args, port=port)
                procs.append(new)

            started = time.monotonic()
            async with asyncio.timeout(120):
                await asyncio.gather(produce(), consume(), restart())
            elapsed = time.monotonic() - started
            await sub.aclose()
        depth = await channel_depth(target, "jobs")
    finally:
        for p in procs:
            stop_process(p)

    expected = {f"job-{i}".encode() for i in range(N)}
    assert set(received) == expected  # the consumer got everything, by itself
    assert all(len(s) == 1 for s in seqs.values())  # each id answered with one seq
    assert len({s for ss in seqs.values() for s in ss}) == N
    assert depth == N  # and stored once
    assert any(c.state is ConnectionState.RECONNECTING for c in changes)
    assert changes[-1].state is ConnectionState.CLOSED and changes[-1].error is None
    duplicates = sum(received.values()) - N
    print(f"\n{how}: {N} messages in {elapsed:.1f} s, {duplicates} delivered twice")
