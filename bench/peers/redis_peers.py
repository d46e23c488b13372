"""Redis pub/sub and Redis Streams through redis-py, against a ``redis-server`` that the harness
starts on a free loopback port (no persistence: like our memory store)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
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


class _RedisPeer(Peer):
    def __init__(self) -> None:
        self.server: Process | None = None
        self.port = 0
        self._runs = 0

    def missing(self) -> str | None:
        return self.need_binary("redis-server", "redis-server") or self.need_module("redis", "redis")

    def versions(self) -> str:
        server = self.binary_version(["redis-server", "--version"]).split(" sha=")[0]
        return f"{server}, {self.dist_version('redis')} (redis-py)"

    def start(self) -> None:
        import redis

        self.port = free_port()
        self.server = Process(
            "redis-server",
            [
                "redis-server",
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                # A subscriber that falls behind a pipelined publisher must not be cut off.
                "--client-output-buffer-limit", "pubsub 0 0 0",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if not self.server.alive():
                    raise BenchError(f"redis-server exited: {self.server.log_tail()}") from None
                time.sleep(0.05)
        raise BenchError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self) -> Any:
        import redis.asyncio

        return redis.asyncio.Redis(host="127.0.0.1", port=self.port)

    def key(self, kind: str) -> str:
        self._runs += 1
        return f"bench.{kind}.{self._runs}"


async def _closing(clients: list[Any], body: Callable[[], Awaitable[Figures]]) -> Figures:
    try:
        return await body()
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.aclose(), 5.0)


class RedisPubSub(_RedisPeer):
    name = "redis-pubsub"
    description = "Redis pub/sub (redis-py, PUBLISH pipelined per batch)"

    async def throughput(self, p: ThroughputParams) -> Figures:
        # Pub/sub has no competing consumers: in queue mode each consumer gets a channel of its
        # own and producers spread their batches over them, so every message is read once.
        base = self.key("ps")
        broadcast = p.mode == "broadcast"
        names = [base] if broadcast else [f"{base}.{j}" for j in range(p.consumers)]
        expected = p.messages * p.consumers if broadcast else p.messages
        consumers = [self.client() for _ in range(p.consumers)]
        producers = [self.client() for _ in range(p.producers)]

        async def body() -> Figures:
            counter = Counter(expected)
            subs = []
            for j, c in enumerate(consumers):
                ps = c.pubsub()
                await ps.subscribe(names[0] if broadcast else names[j])
                subs.append(ps)
            loop = asyncio.get_running_loop()
            readers = [loop.create_task(_read_pubsub(ps, counter, None)) for ps in subs]
            payload = b"x" * p.payload

            async def produce(i: int, n: int) -> None:
                sent = 0
                k = i
                while sent < n:
                    size = min(p.batch, n - sent)
                    pipe = producers[i].pipeline(transaction=False)
                    for _ in range(size):
                        pipe.publish(names[k % len(names)], payload)
                    await pipe.execute()
                    sent += size
                    k += 1

            try:
                async with asyncio.timeout(p.timeout):
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *(produce(i, n) for i, n in enumerate(_split(p.messages, p.producers)))
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

        return await _closing(consumers + producers, body)

    async def latency(self, p: LatencyParams) -> Figures:
        name = self.key("psl")
        consumer, producer = self.client(), self.client()

        async def body() -> Figures:
            latencies: list[int] = []
            counter = Counter(p.messages)
            ps = consumer.pubsub()
            await ps.subscribe(name)
            reader = asyncio.get_running_loop().create_task(_read_pubsub(ps, counter, latencies))
            try:
                async with asyncio.timeout(p.timeout):
                    pacer = Pacer(p.rate)
                    for _ in range(p.messages):
                        await pacer.next()
                        await producer.publish(name, stamp(p.payload))
                    await counter.done.wait()
            finally:
                await stop_tasks([reader])
            return latency_figures(latencies)

        return await _closing([consumer, producer], body)


async def _read_pubsub(ps: Any, counter: Counter, latencies: list[int] | None) -> None:
    # listen() blocks without a timeout per message (get_message(timeout=...) costs a timer
    # each); the task is cancelled once the counter is done.
    async for msg in ps.listen():
        if msg["type"] != "message":
            continue
        if latencies is not None:
            latencies.append(age_ns(msg["data"], time.perf_counter_ns()))
        counter.add(1)


class RedisStreams(_RedisPeer):
    name = "redis-streams"
    description = "Redis Streams (redis-py: XADD pipelined per batch, XREADGROUP COUNT batch, XACK per batch)"

    async def throughput(self, p: ThroughputParams) -> Figures:
        key = self.key("st")
        broadcast = p.mode == "broadcast"
        expected = p.messages * p.consumers if broadcast else p.messages
        admin = self.client()
        consumers = [self.client() for _ in range(p.consumers)]
        producers = [self.client() for _ in range(p.producers)]

        async def body() -> Figures:
            # Broadcast: a group per consumer; queue: one group shared (competing consumers).
            groups = [f"g{j}" for j in range(p.consumers)] if broadcast else ["g"]
            for g in groups:
                await admin.xgroup_create(key, g, id="0", mkstream=True)
            counter = Counter(expected)
            loop = asyncio.get_running_loop()
            readers = [
                loop.create_task(
                    _read_stream(c, key, groups[j] if broadcast else "g", f"c{j}", p.batch, counter, None)
                )
                for j, c in enumerate(consumers)
            ]
            payload = b"x" * p.payload

            async def produce(i: int, n: int) -> None:
                sent = 0
                while sent < n:
                    size = min(p.batch, n - sent)
                    pipe = producers[i].pipeline(transaction=False)
                    for _ in range(size):
                        pipe.xadd(key, {"p": payload})
                    await pipe.execute()
                    sent += size

            try:
                async with asyncio.timeout(p.timeout):
                    t0 = time.perf_counter()
                    await asyncio.gather(
                        *(produce(i, n) for i, n in enumerate(_split(p.messages, p.producers)))
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

        return await _closing([admin, *consumers, *producers], body)

    async def latency(self, p: LatencyParams) -> Figures:
        key = self.key("stl")
        consumer, producer = self.client(), self.client()

        async def body() -> Figures:
            await producer.xgroup_create(key, "g", id="0", mkstream=True)
            latencies: list[int] = []
            counter = Counter(p.messages)
            reader = asyncio.get_running_loop().create_task(
                _read_stream(consumer, key, "g", "c", 100, counter, latencies)
            )
            try:
                async with asyncio.timeout(p.timeout):
                    pacer = Pacer(p.rate)
                    for _ in range(p.messages):
                        await pacer.next()
                        await producer.xadd(key, {"p": stamp(p.payload)})
                    await counter.done.wait()
            finally:
                await stop_tasks([reader])
            return latency_figures(latencies)

        return await _closing([consumer, producer], body)


async def _read_stream(
    client: Any, key: str, group: str, name: str, count: int, counter: Counter, latencies: list[int] | None
) -> None:
    while not counter.done.is_set():
        reply = await client.xreadgroup(group, name, {key: ">"}, count=count, block=500)
        if not reply:
            continue
        entries = reply[0][1]
        if latencies is not None:
            now = time.perf_counter_ns()
            latencies.extend(age_ns(fields[b"p"], now) for _, fields in entries)
        await client.xack(key, group, *[entry_id for entry_id, _ in entries])
        counter.add(len(entries))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def peers() -> list[Peer]:
    return [RedisPubSub(), RedisStreams()]
