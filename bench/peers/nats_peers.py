"""NATS core and NATS JetStream through nats-py, against a ``nats-server`` that the harness
starts on a free loopback port (JetStream with its file store in a temporary directory)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from typing import Any

from pushchannel.bench.peer import (
    BenchError,
    Counter,
    Figures,
    LatencyParams,
    Pacer,
    Peer,
    Process,
    ThroughputParams,
    age_ns,
    free_port,
    latency_figures,
    stamp,
    stop_tasks,
)


class _NatsPeer(Peer):
    jetstream = False

    def __init__(self) -> None:
        self.server: Process | None = None
        self.store_dir: str | None = None
        self.url = ""
        self._runs = 0

    def missing(self) -> str | None:
        return self.need_binary("nats-server", "nats-server") or self.need_module("nats", "nats-py")

    def versions(self) -> str:
        return f"{self.binary_version(['nats-server', '--version'])}, {self.dist_version('nats-py')}"

    def start(self) -> None:
        port = free_port()
        argv = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
        if self.jetstream:
            self.store_dir = tempfile.mkdtemp(prefix="bench-jetstream-")
            argv += ["-js", "-sd", self.store_dir]
        self.server = Process("nats-server", argv)
        self.url = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            if not self.server.alive():
                raise BenchError(f"nats-server exited: {self.server.log_tail()}")
            time.sleep(0.05)
        raise BenchError("nats-server did not listen within 10 s")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None

    async def connect(self) -> Any:
        import nats

        return await nats.connect(self.url, max_reconnect_attempts=0, pending_size=64 << 20)

    def subject(self, kind: str) -> str:
        self._runs += 1
        return f"bench.{kind}.{self._runs}"


async def _close_all(clients: list[Any]) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.close(), 5.0)


class NatsCore(_NatsPeer):
    name = "nats-core"
    description = "NATS core (nats-py; queue group for competing consumers, flush every batch x window)"

    async def throughput(self, p: ThroughputParams) -> Figures:
        subject = self.subject("core")
        broadcast = p.mode == "broadcast"
        expected = p.messages * p.consumers if broadcast else p.messages
        clients: list[Any] = []
        try:
            consumers = [await self.connect() for _ in range(p.consumers)]
            producers = [await self.connect() for _ in range(p.producers)]
            clients = consumers + producers
            counter = Counter(expected)

            async def on_message(msg: Any) -> None:
                counter.add(1)

            for c in consumers:
                await c.subscribe(
                    subject, queue="" if broadcast else "q", cb=on_message, pending_msgs_limit=expected + 1
                )
                await c.flush()
            payload = b"x" * p.payload
            flush_every = p.batch * p.window

            async def produce(nc: Any, n: int) -> None:
                for i in range(1, n + 1):
                    await nc.publish(subject, payload)
                    if i % flush_every == 0:
                        await nc.flush()
                await nc.flush()

            try:
                async with asyncio.timeout(p.timeout):
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *(
                            produce(nc, n)
                            for nc, n in zip(producers, _split(p.messages, p.producers), strict=True)
                        )
                    )
                    published = time.perf_counter()
                    await counter.done.wait()
            except TimeoutError:
                raise BenchError(f"{counter.count} of {expected} delivered within {p.timeout:g} s") from None
            end = max(counter.finished_at, published)
            return {
                "delivered_per_s": expected / (end - t0),
                "published_per_s": p.messages / (published - t0),
            }
        finally:
            await _close_all(clients)

    async def latency(self, p: LatencyParams) -> Figures:
        subject = self.subject("corel")
        clients: list[Any] = []
        try:
            consumer, producer = await self.connect(), await self.connect()
            clients = [consumer, producer]
            latencies: list[int] = []
            counter = Counter(p.messages)

            async def on_message(msg: Any) -> None:
                latencies.append(age_ns(msg.data, time.perf_counter_ns()))
                counter.add(1)

            await consumer.subscribe(subject, cb=on_message)
            await consumer.flush()
            async with asyncio.timeout(p.timeout):
                pacer = Pacer(p.rate)
                for _ in range(p.messages):
                    await pacer.next()
                    await producer.publish(subject, stamp(p.payload))
                await counter.done.wait()
            return latency_figures(latencies)
        finally:
            await _close_all(clients)


class NatsJetStream(_NatsPeer):
    name = "nats-jetstream"
    description = (
        "NATS JetStream, file store (nats-py: publish_async acked; pull consumer fetch(batch) + ack)"
    )
    jetstream = True

    async def throughput(self, p: ThroughputParams) -> Figures:
        subject = self.subject("js")
        stream = subject.replace(".", "_")
        broadcast = p.mode == "broadcast"
        expected = p.messages * p.consumers if broadcast else p.messages
        clients: list[Any] = []
        try:
            consumers = [await self.connect() for _ in range(p.consumers)]
            producers = [await self.connect() for _ in range(p.producers)]
            clients = consumers + producers
            await producers[0].jetstream().add_stream(name=stream, subjects=[subject])
            counter = Counter(expected)
            subs = []
            for j, nc in enumerate(consumers):
                durable = f"c{j}" if broadcast else "c"
                subs.append(await nc.jetstream().pull_subscribe(subject, durable=durable, stream=stream))
            loop = asyncio.get_running_loop()
            readers = [loop.create_task(_pull(s, p.batch, counter, None)) for s in subs]
            payload = b"x" * p.payload

            async def produce(nc: Any, n: int) -> None:
                js = nc.jetstream(publish_async_max_pending=p.batch * p.window)
                for _ in range(n):
                    await js.publish_async(subject, payload)
                await js.publish_async_completed()

            try:
                async with asyncio.timeout(p.timeout):
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *(
                            produce(nc, n)
                            for nc, n in zip(producers, _split(p.messages, p.producers), strict=True)
                        )
                    )
                    published = time.perf_counter()
                    await counter.done.wait()
            except TimeoutError:
                raise BenchError(f"{counter.count} of {expected} delivered within {p.timeout:g} s") from None
            finally:
                await stop_tasks(readers)
            end = max(counter.finished_at, published)
            return {
                "delivered_per_s": expected / (end - t0),
                "published_per_s": p.messages / (published - t0),
            }
        finally:
            await _close_all(clients)

    async def latency(self, p: LatencyParams) -> Figures:
        subject = self.subject("jsl")
        stream = subject.replace(".", "_")
        clients: list[Any] = []
        try:
            consumer, producer = await self.connect(), await self.connect()
            clients = [consumer, producer]
            js = producer.jetstream()
            await js.add_stream(name=stream, subjects=[subject])
            sub = await consumer.jetstream().pull_subscribe(subject, durable="lat", stream=stream)
            latencies: list[int] = []
            counter = Counter(p.messages)
            reader = asyncio.get_running_loop().create_task(_pull(sub, 100, counter, latencies))
            sends: set[asyncio.Task[Any]] = set()
            try:
                async with asyncio.timeout(p.timeout):
                    pacer = Pacer(p.rate)
                    for _ in range(p.messages):
                        await pacer.next()
                        task = asyncio.get_running_loop().create_task(js.publish(subject, stamp(p.payload)))
                        sends.add(task)
                        task.add_done_callback(sends.discard)
                    await counter.done.wait()
            finally:
                await stop_tasks([reader, *sends])
            return latency_figures(latencies)
        finally:
            await _close_all(clients)


async def _pull(sub: Any, batch: int, counter: Counter, latencies: list[int] | None) -> None:
    import nats.errors

    while not counter.done.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        if latencies is not None:
            now = time.perf_counter_ns()
            latencies.extend(age_ns(m.data, now) for m in msgs)
        for m in msgs:
            await m.ack()
        counter.add(len(msgs))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def peers() -> list[Peer]:
    return [NatsCore(), NatsJetStream()]
