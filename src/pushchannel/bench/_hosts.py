"""The load side of the many-stream scenarios (``fanout``, ``streams``): thousands of
subscribers or hosts in one load process, over raw stubs or SDK clients."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.bench._load import (
    FanoutParams,
    Figures,
    StreamsParams,
    channel_name,
    connections,
    consume,
    delete_default_group,
    open_subscription,
    publish_pipelined,
    stop_tasks,
    until,
)
from pushchannel.bench._procs import BenchError
from pushchannel.bench._rpc import Metadata, Stubs, SubscribeCall, shape_metadata
from pushchannel.bench._stats import Counter, stamp

T = TypeVar("T")


# -- fanout ----------------------------------------------------------------------------------------


async def fanout(target: str, p: FanoutParams, server_cpu: Callable[[], float]) -> Figures:
    """N broadcast subscribers on one channel; each round publishes one message and times it
    until every subscriber has read it. ``server_cpu``: the server process's CPU seconds so far."""
    channel = channel_name("fan")
    rounds: list[Counter] = [Counter(p.subscribers) for _ in range(p.rounds)]
    sink = Counter(1 << 62)  # rounds are counted by record()

    def reader(call: SubscribeCall) -> Coroutine[Any, Any, None]:
        seen = 0  # rounds go one at a time, so a subscriber's k-th delivery is round k

        def record(deliveries: Sequence[pb.Delivery]) -> None:
            nonlocal seen
            for _ in deliveries:
                if seen < len(rounds):
                    rounds[seen].add(1)
                seen += 1

        return consume(call, sink, ack=p.ack, on_batch=record)

    n_conns = -(-p.subscribers // p.per_connection)
    async with connections(target, n_conns + 1) as conns:
        producer = conns[0]
        subscriber_conns = [conns[1 + i // p.per_connection] for i in range(p.subscribers)]
        gate = asyncio.Semaphore(p.open_concurrency)
        request = pb.Open(
            channel=channel,
            mode=pb.Open.BROADCAST,
            max_in_flight=100,
            ack_deadline_ms=600_000,
            auto_ack=not p.ack,
        )
        md = shape_metadata(0, 1, p.payload)

        async def open_one(stubs: Stubs) -> SubscribeCall:
            async with gate:
                return await _retrying(lambda: open_subscription(stubs, request, md), attempts=5)

        t_open = time.perf_counter()
        try:
            async with asyncio.timeout(p.timeout):
                calls = await asyncio.gather(*(open_one(s) for s in subscriber_conns))
        except TimeoutError:
            raise BenchError(f"fanout: subscribers not open within {p.timeout:g} s") from None
        open_s = time.perf_counter() - t_open
        await delete_default_group(producer, channel)
        loop = asyncio.get_running_loop()
        readers = [loop.create_task(reader(c)) for c in calls]
        times: list[float] = []
        cpu_at_start = server_cpu(), time.process_time()
        try:
            async with asyncio.timeout(p.timeout):
                for counter in rounds:
                    t0 = time.perf_counter()
                    await producer.publish(
                        pb.PublishRequest(channel=channel, messages=[pb.Message(payload=stamp(p.payload))])
                    )
                    await until(counter, readers)
                    times.append(counter.finished_at - t0)
                    await asyncio.sleep(0.05)
            server_cpu_s, load_cpu_s = server_cpu() - cpu_at_start[0], time.process_time() - cpu_at_start[1]
        except TimeoutError:
            got = [c.count for c in rounds]
            raise BenchError(f"fanout: not everyone got every round within {p.timeout:g} s: {got}") from None
        finally:
            for c in calls:
                c.cancel()
            await stop_tasks(readers)
    times.sort()
    mid = times[len(times) // 2]
    return {
        "one_to_all_ms": mid * 1000,
        "one_to_all_max_ms": times[-1] * 1000,
        "deliveries_per_s": p.subscribers / mid,
        "server_cpu_ms": server_cpu_s * 1000 / p.rounds,
        "load_cpu_ms": load_cpu_s * 1000 / p.rounds,
        "open_s": open_s,
    }


async def _retrying(
    attempt: Callable[[], Awaitable[SubscribeCall]], *, attempts: int, failures: list[str] | None = None
) -> SubscribeCall:
    """What an SDK does in a reconnect storm: retry with exponential backoff and full jitter.
    ``failures`` gets the status code of each failed first attempt."""
    delay = 0.1
    for i in range(attempts):
        try:
            return await attempt()
        except (grpc.aio.AioRpcError, BenchError) as e:
            if failures is not None and i == 0:
                failures.append(e.code().name if isinstance(e, grpc.aio.AioRpcError) else "no Opened")
            if i == attempts - 1:
                raise
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


# -- streams ---------------------------------------------------------------------------------------


async def streams(target: str, rss: Callable[[], int], p: StreamsParams) -> Figures:
    """N hosts, each on its own channel (and connection), open their streams all at once (a
    reconnect storm); then one message is pushed to each host over one PublishStream."""
    run = channel_name("host")
    names = [f"{run}.{i}" for i in range(p.streams)]
    md = shape_metadata(0, 1, p.payload)
    await _warm_up(target, md)
    rss_before = rss()
    got = Counter(p.streams)
    async with connections(target, 1) as (producer,), contextlib.AsyncExitStack() as stack:
        t0 = time.perf_counter()
        if p.client == "sdk":
            hosts, failures = await _sdk_hosts(target, names, got, p, stack)
        else:
            hosts, failures = await _raw_hosts(target, names, got, p, stack)
        open_s = time.perf_counter() - t0
        opened = len(hosts)
        await asyncio.sleep(p.settle)
        rss_after = rss()
        message = pb.Message(payload=b"x" * p.payload)
        requests = [pb.PublishRequest(channel=n, messages=[message]) for n in names]
        got.expected = opened
        t1 = time.perf_counter()
        try:
            async with asyncio.timeout(p.timeout):
                await publish_pipelined(producer.publish_stream(None), requests, 256)
                if opened:
                    await until(got, hosts)
        except TimeoutError:
            pass  # reported as served < streams
        push_s = (got.finished_at if got.done.is_set() else time.perf_counter()) - t1
    figures = {
        "open_s": open_s,
        "opened": float(opened),
        "rss_per_stream_kb": (rss_after - rss_before) / p.streams / 1024,
        "push_all_ms": push_s * 1000,
        "served": float(min(got.count, opened)),
    }
    if failures is not None:  # the SDK retries by itself: its failed first opens are not seen
        figures["first_try_failures"] = float(len(failures))
        figures.update({f"first_try_{c.lower()}": float(failures.count(c)) for c in sorted(set(failures))})
    return figures


async def _raw_hosts(
    target: str, names: Sequence[str], got: Counter, p: StreamsParams, stack: contextlib.AsyncExitStack
) -> tuple[list[asyncio.Task[None]], list[str]]:
    """Hosts over raw stubs, retrying failed opens as an SDK would; the open streams' tasks
    and the status codes of the failed first opens."""
    failures: list[str] = []
    n_conns = -(-len(names) // p.per_connection)
    conns = await stack.enter_async_context(connections(target, n_conns))
    md = shape_metadata(0, 1, p.payload)

    async def open_host(i: int) -> SubscribeCall:
        request = pb.Open(channel=names[i], max_in_flight=100, ack_deadline_ms=600_000)
        stubs = conns[i // p.per_connection]
        return await _retrying(
            lambda: open_subscription(stubs, request, md), attempts=p.attempts, failures=failures
        )

    results = await _bounded_gather([open_host(i) for i in range(len(names))], p.timeout)
    calls = [r for r in results if not isinstance(r, BaseException)]
    loop = asyncio.get_running_loop()
    hosts = [loop.create_task(_host(call, got)) for call in calls]

    async def stop() -> None:
        for call in calls:
            call.cancel()
        await stop_tasks(hosts)

    stack.push_async_callback(stop)
    return hosts, failures


async def _sdk_hosts(
    target: str, names: Sequence[str], got: Counter, p: StreamsParams, stack: contextlib.AsyncExitStack
) -> tuple[list[asyncio.Task[None]], None]:
    """Hosts as SDK clients (``AsyncClient.subscribe``), which retry failed opens themselves:
    a client each, or, with ``per_connection`` above 1, one client for them all (a gateway's)
    that puts that many streams on each of its connections."""
    from pushchannel.client import AsyncClient, Subscription

    if p.per_connection > 1:
        gateway = AsyncClient(target, streams_per_connection=p.per_connection)
        clients = [gateway] * len(names)
    else:
        clients = [AsyncClient(target) for _ in names]

    async def close_clients() -> None:
        await asyncio.gather(*(c.close() for c in set(clients)), return_exceptions=True)

    stack.push_async_callback(close_clients)
    subs = [
        c.subscribe(n, max_in_flight=100, ack_deadline=600.0) for c, n in zip(clients, names, strict=True)
    ]
    results = await _bounded_gather([s.open() for s in subs], p.timeout)

    async def host(sub: Subscription) -> None:
        seen = False
        async for message in sub:
            if not seen:
                seen = True
                got.add(1)
            await message.ack()

    loop = asyncio.get_running_loop()
    hosts = [
        loop.create_task(host(s))
        for s, r in zip(subs, results, strict=True)
        if not isinstance(r, BaseException)
    ]

    async def stop() -> None:
        await stop_tasks(hosts)

    stack.push_async_callback(stop)
    return hosts, None


async def _host(call: SubscribeCall, got: Counter) -> None:
    """A host: counts its first delivery, acks everything."""
    seen = False

    def first(deliveries: Sequence[pb.Delivery]) -> None:
        nonlocal seen
        if deliveries and not seen:
            seen = True
            got.add(1)

    await consume(call, Counter(0), on_batch=first)


async def _warm_up(target: str, md: Metadata) -> None:
    """One stream and one message first, so that the RSS baseline has the code paths paged in."""
    channel = channel_name("warm")
    async with connections(target, 1) as (stubs,):
        call = await open_subscription(stubs, pb.Open(channel=channel), md)
        try:
            await stubs.publish(pb.PublishRequest(channel=channel, messages=[pb.Message(payload=b"w")]))
            async with asyncio.timeout(10):
                await call.read()
        finally:
            call.cancel()


async def _bounded_gather(coros: Sequence[Awaitable[T]], timeout: float) -> list[T | BaseException]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    return await asyncio.gather(*tasks, return_exceptions=True)
