"""The load side of each scenario, over raw gRPC stubs: the same code drives the broker, the
raw-gRPC ceiling and the minimal broker, so their figures differ only by the server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
import grpc.aio

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.bench._procs import BenchError
from pushchannel.bench._rpc import (
    Metadata,
    PublishStreamCall,
    Stubs,
    SubscribeCall,
    shape_metadata,
)
from pushchannel.bench._stats import Counter, Pacer, age_ns, latency_figures, stamp

Figures = dict[str, float]
T = TypeVar("T")
_run_ids = itertools.count(1)


def channel_name(kind: str) -> str:
    """A channel no earlier run used, so runs on one server do not see each other."""
    return f"bench.{kind}.{os.getpid()}.{next(_run_ids)}"


@dataclass(frozen=True, slots=True)
class ThroughputParams:
    producers: int = 2
    consumers: int = 2
    messages: int = 200_000
    payload: int = 100
    batch: int = 100
    mode: Literal["queue", "broadcast"] = "queue"
    max_in_flight: int = 2000
    window: int = 8  # PublishStream requests in flight per producer
    timeout: float = 180.0


@dataclass(frozen=True, slots=True)
class LatencyParams:
    rate: float = 1000.0
    messages: int = 10_000
    payload: int = 100
    timeout: float = 120.0


@dataclass(frozen=True, slots=True)
class FanoutParams:
    subscribers: int = 5000
    rounds: int = 10
    payload: int = 100
    # One load process cannot be 5,000 hosts: with a connection each and an Ack per delivery,
    # the load side's Python is what takes the time (raw gRPC and the broker alike). Sharing
    # connections and auto_ack (fire-and-forget hosts) leave the server's share visible.
    per_connection: int = 50
    ack: bool = False  # False: auto_ack subscriptions, no Ack requests
    open_concurrency: int = 500
    timeout: float = 180.0


@dataclass(frozen=True, slots=True)
class StreamsParams:
    streams: int = 10_000
    payload: int = 100
    per_connection: int = 1  # streams sharing one connection (1: each its own, as hosts)
    client: Literal["raw", "sdk"] = "raw"
    attempts: int = 8  # opens per stream before giving up (a reconnect storm loses some)
    settle: float = 1.0  # seconds between the last open and the RSS reading
    timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class SeedParams:
    producers: int = 64  # SubmitMessage calls in flight
    messages: int = 20_000
    payload: int = 100
    timeout: float = 120.0


# -- plumbing --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connections(target: str, n: int) -> AsyncIterator[list[Stubs]]:
    """``n`` grpc channels (TCP connections) to ``target``, all closed on the way out."""
    stubs = [Stubs.connect(target) for _ in range(n)]
    try:
        yield stubs
    finally:
        await asyncio.gather(*(s.close() for s in stubs), return_exceptions=True)


async def stop_tasks(tasks: Sequence[asyncio.Task[object]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def open_subscription(stubs: Stubs, request: pb.Open, metadata: Metadata) -> SubscribeCall:
    call = stubs.subscribe(None, metadata=metadata)
    try:
        await call.write(pb.SubscribeRequest(open=request))
        first = await call.read()
    except BaseException:
        call.cancel()
        raise
    if not isinstance(first, pb.SubscribeResponse) or not first.HasField("opened"):
        call.cancel()
        raise BenchError(f"Subscribe on {request.channel} did not answer Opened")
    return call


async def consume(
    call: SubscribeCall,
    counter: Counter,
    *,
    ack: bool = True,
    on_batch: Callable[[Sequence[pb.Delivery]], None] | None = None,
) -> None:
    """Read delivery batches until the stream ends, acking each batch in one request."""
    Request, Ack = pb.SubscribeRequest, pb.Ack
    while True:
        response = await call.read()
        if not isinstance(response, pb.SubscribeResponse):  # EOF
            return
        if response.HasField("deliveries"):
            deliveries = response.deliveries.deliveries
            if on_batch is not None:
                on_batch(deliveries)
            counter.add(len(deliveries))
            if ack:
                await call.write(Request(ack=Ack(delivery_tags=[d.delivery_tag for d in deliveries])))


async def publish_pipelined(
    call: PublishStreamCall, requests: Sequence[pb.PublishRequest], window: int
) -> None:
    """Send ``requests`` over one PublishStream with at most ``window`` unanswered."""
    free = asyncio.Semaphore(window)
    failure: list[str] = []

    async def read_answers() -> None:
        try:
            for _ in range(len(requests)):
                response = await call.read()
                if not isinstance(response, pb.PublishResponse):  # EOF
                    raise BenchError("PublishStream ended before every request was answered")
                if response.error_code:
                    raise BenchError(f"publish failed: {response.error_message}")
                free.release()
        except BaseException as e:
            failure.append(str(e) or type(e).__name__)
            for _ in range(window):
                free.release()
            raise

    reader = asyncio.get_running_loop().create_task(read_answers())
    try:
        for ref, request in enumerate(requests):
            await free.acquire()
            if failure:
                break
            request.ref = ref  # serialised by write(), so one request object may be reused
            await call.write(request)
        await call.done_writing()
        await reader
    finally:
        reader.cancel()
        call.cancel()
    if failure:
        raise BenchError(failure[0])


async def delete_default_group(stubs: Stubs, channel: str) -> None:
    """Broadcast-only channels: nobody will read the ``default`` group, so it keeps nothing
    (what a user does for such channels). The baselines do not implement it."""
    delete = stubs.channel.unary_unary(
        "/pushchannel.v1.Broker/DeleteGroup",
        request_serializer=pb.DeleteGroupRequest.SerializeToString,
        response_deserializer=pb.DeleteGroupResponse.FromString,
    )
    with contextlib.suppress(grpc.aio.AioRpcError):
        await delete(pb.DeleteGroupRequest(channel=channel, group="default"))


# -- throughput ------------------------------------------------------------------------------------


async def throughput(target: str, p: ThroughputParams) -> Figures:
    """N producers pipelining batches over PublishStream -> M consumers acking each batch.
    The figure is messages delivered per second, from the first publish until every message
    was delivered and every publish answered."""
    channel = channel_name("tp")
    per_producer = _split(p.messages, p.producers)
    broadcast = p.mode == "broadcast"
    expected = p.messages * p.consumers if broadcast else p.messages
    async with connections(target, p.producers + p.consumers) as conns:
        consumer_conns, producer_conns = conns[: p.consumers], conns[p.consumers :]
        share = _split(p.messages, p.consumers)
        opens = [
            open_subscription(
                c,
                pb.Open(
                    channel=channel,
                    mode=pb.Open.BROADCAST if broadcast else pb.Open.QUEUE,
                    position=pb.Open.NEW if broadcast else pb.Open.EARLIEST,
                    max_in_flight=p.max_in_flight,
                    ack_deadline_ms=600_000,
                ),
                shape_metadata(p.messages if broadcast else share[i], p.batch, p.payload),
            )
            for i, c in enumerate(consumer_conns)
        ]
        calls = await asyncio.gather(*opens)
        if broadcast:
            await delete_default_group(producer_conns[0], channel)
        counter = Counter(expected)
        loop = asyncio.get_running_loop()
        consumers = [loop.create_task(consume(call, counter)) for call in calls]
        message = pb.Message(payload=b"x" * p.payload)
        try:
            async with asyncio.timeout(p.timeout):
                t0 = time.perf_counter()
                published_at = await _produce(producer_conns, channel, message, per_producer, p)
                await until(counter, consumers)
        except TimeoutError:
            raise BenchError(
                f"throughput: {counter.count} of {expected} delivered within {p.timeout:g} s"
            ) from None
        finally:
            for call in calls:
                call.cancel()
            await stop_tasks(consumers)
    end = max(counter.finished_at, published_at)
    return {
        "delivered_per_s": expected / (end - t0),
        "published_per_s": p.messages / (published_at - t0),
        "seconds": end - t0,
    }


async def _produce(
    conns: Sequence[Stubs],
    channel: str,
    message: pb.Message,
    per_producer: Sequence[int],
    p: ThroughputParams,
) -> float:
    async def one(stubs: Stubs, count: int) -> None:
        full, rest = divmod(count, p.batch)
        # One request object sent again and again: only its ref changes, and write()
        # serialises it at once.
        requests = [pb.PublishRequest(channel=channel, messages=[message] * p.batch)] * full
        if rest:
            requests.append(pb.PublishRequest(channel=channel, messages=[message] * rest))
        await publish_pipelined(stubs.publish_stream(None), requests, p.window)

    await asyncio.gather(*(one(s, n) for s, n in zip(conns, per_producer, strict=True)))
    return time.perf_counter()


async def until(counter: Counter, consumers: Sequence[asyncio.Task[None]]) -> None:
    """Wait for the counter; a consumer that failed ends the wait with its error."""
    done_waiter: asyncio.Task[object] = asyncio.get_running_loop().create_task(counter.done.wait())
    try:
        pending: set[asyncio.Task[object]] = {done_waiter, *consumers}
        while not counter.done.is_set():
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if task is not done_waiter and task.exception() is not None:
                    raise BenchError(f"a consumer failed: {_describe(task.exception())}")
            if not pending - {done_waiter} and not counter.done.is_set():
                raise BenchError(f"every stream ended after {counter.count} of {counter.expected} deliveries")
    finally:
        done_waiter.cancel()


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- latency ---------------------------------------------------------------------------------------


async def latency(target: str, p: LatencyParams) -> Figures:
    """One producer publishing one message per unary Publish at a fixed rate, one consumer;
    latency is publish call start -> delivery read, both in this process."""
    channel = channel_name("lat")
    latencies: list[int] = []

    def record(deliveries: Sequence[pb.Delivery]) -> None:
        now = time.perf_counter_ns()
        latencies.extend(age_ns(d.payload, now) for d in deliveries)

    async with connections(target, 2) as (consumer_conn, producer_conn):
        call = await open_subscription(
            consumer_conn,
            pb.Open(channel=channel, position=pb.Open.EARLIEST, max_in_flight=1000, ack_deadline_ms=600_000),
            shape_metadata(0, 1, p.payload),
        )
        counter = Counter(p.messages)
        consumer = asyncio.get_running_loop().create_task(consume(call, counter, on_batch=record))
        publish = producer_conn.publish
        in_flight = asyncio.Semaphore(1000)
        failures: list[BaseException] = []

        async def send() -> None:
            try:
                await publish(
                    pb.PublishRequest(channel=channel, messages=[pb.Message(payload=stamp(p.payload))])
                )
            except BaseException as e:
                failures.append(e)
            finally:
                in_flight.release()

        senders: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.timeout(p.timeout):
                pacer = Pacer(p.rate)
                t0 = time.perf_counter()
                for _ in range(p.messages):
                    await pacer.next()
                    await in_flight.acquire()
                    if failures:
                        raise BenchError(f"publish failed: {_describe(failures[0])}")
                    task = asyncio.get_running_loop().create_task(send())
                    senders.add(task)
                    task.add_done_callback(senders.discard)
                sent_at = time.perf_counter()
                await until(counter, [consumer])
        except TimeoutError:
            raise BenchError(
                f"latency: {counter.count} of {p.messages} delivered within {p.timeout:g} s"
            ) from None
        finally:
            call.cancel()
            await stop_tasks([consumer, *senders])
    figures = latency_figures(latencies)
    figures["rate"] = p.messages / (sent_at - t0)
    return figures


# -- seed ------------------------------------------------------------------------------------------


async def seed(target: str, p: SeedParams) -> Figures:
    """The seed's path: ``producers`` SubmitMessage calls in flight -> one PushMessageStream."""
    channel = channel_name("seed")
    counter = Counter(p.messages)
    async with connections(target, 2) as (consumer_conn, producer_conn):
        call = consumer_conn.push_stream(
            push_pb2.ConnRequest(channel=channel), metadata=shape_metadata(p.messages, 1, p.payload)
        )

        async def read() -> None:
            async for _ in call:
                counter.add(1)

        reader = asyncio.get_running_loop().create_task(read())
        await asyncio.sleep(0.2)  # the stream is open (the seed protocol has no Opened frame)
        request = push_pb2.SubmitRequest(channel=channel, message="x" * p.payload)
        submit = producer_conn.submit

        async def submitter(n: int) -> None:
            for _ in range(n):
                await submit(request)

        try:
            async with asyncio.timeout(p.timeout):
                t0 = time.perf_counter()
                await asyncio.gather(*(submitter(n) for n in _split(p.messages, p.producers)))
                submitted_at = time.perf_counter()
                await until(counter, [reader])
        except TimeoutError:
            raise BenchError(
                f"seed: {counter.count} of {p.messages} delivered within {p.timeout:g} s"
            ) from None
        finally:
            call.cancel()
            await stop_tasks([reader])
    end = max(counter.finished_at, submitted_at)
    return {"delivered_per_s": p.messages / (end - t0), "submitted_per_s": p.messages / (submitted_at - t0)}
