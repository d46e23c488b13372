"""Crash test: a real broker on SQLite is killed with SIGKILL several times while producers
publish and consumers of one durable group consume; it comes back on the same port and file.

Producers publish batches of messages with ids and retry a publish that got no answer with the
same ids (so the dedupe window is exercised across restarts); consumers record each delivery,
then ack it, and reconnect when their stream breaks. After a bounded final drain the queue
checker (tests/durability/checker.py) prints

    acked-published N, delivered N, lost 0, duplicates D, unexpected 0

and the test fails on any loss, unexpected message, or message stored twice. Run with ``-s`` to
see the line; ``PUSHCHANNEL_KILL9_SEED=N`` replays the kill timing of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from tests.durability._broker import BrokerProcess, channel_info, connect, group_info
from tests.durability.checker import History, check, payload_for
from tests.server.helpers import lost_write

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHANNEL = "orders.kill9"
GROUP = "workers"
PRODUCERS = 3
CONSUMERS = 2
BATCH = 10
PAUSE = 0.05  # between one producer's batches
MAX_BATCHES = 200  # per producer: at most 6,000 messages in all
KILLS = 5
ACK_DELAY = 0.1  # consumers ack what they recorded this long after
ACK_DEADLINE_MS = 2000  # what a killed broker had handed out comes back this soon after restart
RUN_LIMIT = 60.0  # no loop of this test runs longer than this
DRAIN = 20.0  # the final drain's bound
MIN_MESSAGES = 1000  # a run that published fewer proves too little
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Run:
    def __init__(self, target: str) -> None:
        self.target = target
        self.history = History()
        self.producing = True
        self.deadline = time.monotonic() + RUN_LIMIT
        self.answered_batches: list[list[tuple[str, int]]] = []
        self.stream_breaks = 0
        self.publish_failures = 0
        self.publish_started = asyncio.Event()
        self.stored_unanswered = 0  # messages whose unanswered publish had been stored

    def check_time(self, who: str) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"{who} still running after {RUN_LIMIT} s")


def publish_request(ids: list[str]) -> pb.PublishRequest:
    return pb.PublishRequest(
        channel=CHANNEL, messages=[pb.Message(id=i, payload=payload_for(i)) for i in ids]
    )


async def produce(run: Run, k: int) -> None:
    """Publish batches until told to stop; an unanswered batch is sent again, same ids."""
    async with connect(run.target) as stub:
        for b in range(MAX_BATCHES):
            if not run.producing:
                return
            ids = [f"p{k}-{b}-{j}" for j in range(BATCH)]
            request = publish_request(ids)
            attempt = 0
            while True:
                attempt += 1
                run.check_time(f"producer {k}")
                run.history.attempted(ids)
                run.publish_started.set()
                try:
                    resp = await stub.Publish(request, timeout=3, wait_for_ready=True)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE:
                        raise
                    run.publish_failures += 1
                    await asyncio.sleep(0.05)
            assert len(resp.results) == BATCH
            if attempt > 1:
                run.stored_unanswered += sum(1 for r in resp.results if r.duplicate)
            for i, r in zip(ids, resp.results, strict=True):
                run.history.answered(i, r.seq, r.duplicate)
            run.answered_batches.append([(i, r.seq) for i, r in zip(ids, resp.results, strict=True)])
            await asyncio.sleep(PAUSE)


async def consume(run: Run, c: int) -> None:
    """One consumer of the durable group: record each delivery, then ack it; reconnect."""
    open_request = pb.SubscribeRequest(
        open=pb.Open(
            channel=CHANNEL,
            group=GROUP,
            position=pb.Open.EARLIEST,
            max_in_flight=200,
            ack_deadline_ms=ACK_DEADLINE_MS,
        )
    )
    while True:
        run.check_time(f"consumer {c}")
        requests: asyncio.Queue[pb.SubscribeRequest] = asyncio.Queue()
        requests.put_nowait(open_request)
        unacked: list[int] = []

        async def ack_later(
            tags: list[int] = unacked, q: asyncio.Queue[pb.SubscribeRequest] = requests
        ) -> None:
            # Acks go out in batches a little later, as a host's would: a kill finds some
            # deliveries recorded but not acked yet, and those come back (duplicates).
            while True:
                await asyncio.sleep(ACK_DELAY)
                if tags:
                    q.put_nowait(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=tags)))
                    tags.clear()

        async def outgoing(
            q: asyncio.Queue[pb.SubscribeRequest] = requests,
        ) -> AsyncIterator[pb.SubscribeRequest]:
            while True:
                yield await q.get()

        async with connect(run.target) as stub:
            call = stub.Subscribe(outgoing(), wait_for_ready=True)
            acker = asyncio.get_running_loop().create_task(ack_later())
            try:
                async for resp in call:
                    if resp.WhichOneof("kind") != "deliveries":
                        continue
                    for d in resp.deliveries.deliveries:
                        run.history.delivered(d.id, d.seq, d.payload, d.attempt)
                        unacked.append(d.delivery_tag)
            except grpc.aio.AioRpcError as exc:
                # An ack written as the kill reset the connection (lost_write) is a broken
                # stream too, as the SDK treats it.
                if exc.code() not in RETRYABLE and not lost_write(exc):
                    raise
                run.stream_breaks += 1
            finally:
                call.cancel()
                acker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acker
        await asyncio.sleep(0.05)


async def republish(run: Run, batch: list[tuple[str, int]]) -> None:
    """A publish answered before the crash, sent again after it: duplicate, same seqs."""
    ids = [i for i, _ in batch]
    run.history.attempted(ids)
    async with connect(run.target) as stub:
        resp = await stub.Publish(publish_request(ids), timeout=5, wait_for_ready=True)
    got = [(r.seq, r.duplicate) for r in resp.results]
    assert got == [(seq, True) for _, seq in batch], f"a retry after the crash was stored again: {got}"
    for i, r in zip(ids, resp.results, strict=True):
        run.history.answered(i, r.seq, r.duplicate)


def raise_if_failed(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            t.result()


async def test_kill_9_loses_nothing_acknowledged(tmp_path):
    seed = int(os.environ.get("PUSHCHANNEL_KILL9_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    started = time.monotonic()
    broker = BrokerProcess(tmp_path, "--heartbeat", "1")
    run = Run(broker.target)
    consumers: list[asyncio.Task[None]] = []
    producers: list[asyncio.Task[None]] = []
    try:
        await broker.start()
        loop = asyncio.get_running_loop()
        consumers = [loop.create_task(consume(run, c)) for c in range(CONSUMERS)]
        producers = [loop.create_task(produce(run, k)) for k in range(PRODUCERS)]

        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.5, 1.8))
            raise_if_failed(consumers + producers)
            # Aim at a publish in flight (it may still be answered first): some publishes
            # are then stored but never answered, and their retries must come back duplicate.
            run.publish_started.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.publish_started.wait(), 0.5)
            await asyncio.sleep(rng.uniform(0, 0.005))
            answered_before = list(run.answered_batches)
            await broker.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await broker.start()
            if answered_before:
                await republish(run, rng.choice(answered_before[-30:]))

        run.producing = False
        async with asyncio.timeout(RUN_LIMIT):
            await asyncio.gather(*producers)
        drain_until = time.monotonic() + DRAIN
        while not run.history.acked_ids() <= run.history.delivered_ids() and time.monotonic() < drain_until:
            raise_if_failed(consumers)
            await asyncio.sleep(0.1)
        raise_if_failed(consumers)
        async with connect(broker.target) as stub:
            info = await channel_info(stub, CHANNEL)

        report = check(run.history)
        elapsed = time.monotonic() - started
        print(f"\n{report.line()}")
        print(
            f"(seed {seed}: {broker.kills} kills in {elapsed:.1f} s; {report.deliveries} deliveries, "
            f"{run.stream_breaks} broken streams, {run.publish_failures} failed publish calls retried, "
            f"{run.stored_unanswered} retried messages found stored (duplicate=true), "
            f"last_seq {info.last_seq})"
        )
        context = f"seed {seed}\n{report.details()}\n{broker.log_tail()}"
        assert report.ok, context
        assert broker.kills == KILLS
        assert report.acked_published >= MIN_MESSAGES, context
        # Every stored message is one published id: no seq was spent on a retry.
        assert info.last_seq == report.acked_published, context
        assert info.depth == info.last_seq, context  # nobody consumed the default group
        assert group_info(info, GROUP).cursor == info.last_seq, context
    finally:
        run.producing = False
        for t in consumers + producers:
            t.cancel()
        for t in consumers + producers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        broker.stop()
