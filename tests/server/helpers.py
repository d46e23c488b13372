"""Raw-gRPC helpers for the server tests: a subscriber fed from a queue, publishing shortcuts,
and bounded waits. Everything talks to a real broker over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
import grpc.aio

from pushchannel._proto import push_pb2_grpc
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc

EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
STEP = 5.0  # the most any single expected event may take before a test fails


def stub(channel: grpc.aio.Channel) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(channel)  # type: ignore[no-untyped-call]


def seed_stub(channel: grpc.aio.Channel) -> push_pb2_grpc.MessageSyncStub:
    """The project's own seed stub (tests/server/test_seed.py generates its own from the SPEC)."""
    return push_pb2_grpc.MessageSyncStub(channel)  # type: ignore[no-untyped-call]


def msg(
    payload: bytes | str,
    *,
    id: str = "",
    attributes: Mapping[str, str] | None = None,
    ttl_ms: int = 0,
) -> pb.Message:
    data = payload.encode() if isinstance(payload, str) else payload
    return pb.Message(id=id, payload=data, attributes=dict(attributes or {}), ttl_ms=ttl_ms)


async def publish(
    broker: broker_pb2_grpc.BrokerStub, channel: str, *messages: pb.Message | bytes | str
) -> list[pb.PublishResult]:
    """Publish in one call; payloads may be given bare. The results, one per message."""
    ms = [m if isinstance(m, pb.Message) else msg(m) for m in messages]
    resp = await broker.Publish(pb.PublishRequest(channel=channel, messages=ms), timeout=STEP)
    return list(resp.results)


async def publish_payloads(
    broker: broker_pb2_grpc.BrokerStub, channel: str, payloads: Iterable[bytes], batch: int = 200
) -> list[int]:
    """Publish many payloads in batches, in order; their seqs."""
    seqs: list[int] = []
    chunk: list[pb.Message] = []
    for p in payloads:
        chunk.append(pb.Message(payload=p))
        if len(chunk) == batch:
            seqs += [r.seq for r in await publish(broker, channel, *chunk)]
            chunk = []
    if chunk:
        seqs += [r.seq for r in await publish(broker, channel, *chunk)]
    return seqs


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Await a call that must fail; its error."""
    try:
        await asyncio.wait_for(call, STEP)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but was expected to fail")


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = STEP, every: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


async def consumer_count(broker: broker_pb2_grpc.BrokerStub, channel: str) -> int:
    try:
        info = await broker.GetChannel(pb.GetChannelRequest(channel=channel), timeout=STEP)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    return len(info.consumers)


def lost_write(exc: grpc.aio.AioRpcError) -> bool:
    """A request written as the stream ended (the broker closed it, or the connection was reset)
    fails on the client side as INTERNAL "Failed execute_batch": not an answer of the broker's.
    grpc.aio gives the whole call that status in place of the broker's, which it received first
    (a probe of 264 such races: the broker's status was never readable afterwards), so a stream
    that writes while the broker ends it cannot tell why it ended."""
    return exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (exc.debug_error_string() or "")


class Subscriber:
    """One ``Subscribe`` stream: requests go through a queue, deliveries arrive in another.

    With ``ack_on_receipt`` every batch is acked as soon as it is read (a well-behaved host);
    otherwise the test acks, nacks and extends by hand.
    """

    def __init__(self, channel: grpc.aio.Channel, *, ack_on_receipt: bool = False) -> None:
        self._stub = stub(channel)
        self._requests: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self.deliveries: asyncio.Queue[pb.Delivery] = asyncio.Queue()
        self.received: list[pb.Delivery] = []
        self.heartbeats: list[pb.Heartbeat] = []
        self.heartbeat_arrived = asyncio.Event()
        self.ack_on_receipt = ack_on_receipt
        self.opened: pb.Opened | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _gen(self) -> AsyncIterator[pb.SubscribeRequest]:
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    async def open(self, channel: str, **fields: Any) -> pb.Opened:
        """Send Open (``fields`` are Open's fields) and wait for Opened."""
        self._requests.put_nowait(pb.SubscribeRequest(open=pb.Open(channel=channel, **fields)))
        self._call = self._stub.Subscribe(self._gen())
        first = await asyncio.wait_for(self._call.read(), STEP)
        assert isinstance(first, pb.SubscribeResponse), "the stream ended before Opened"
        assert first.WhichOneof("kind") == "opened", first
        opened: pb.Opened = first.opened
        self.opened = opened
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return opened

    async def _read(self) -> None:
        assert self._call is not None
        try:
            while True:
                resp = await self._call.read()
                if resp is EOF:
                    return
                assert isinstance(resp, pb.SubscribeResponse)
                kind = resp.WhichOneof("kind")
                if kind == "deliveries":
                    batch = list(resp.deliveries.deliveries)
                    for d in batch:
                        self.received.append(d)
                        self.deliveries.put_nowait(d)
                    if self.ack_on_receipt:
                        self.ack(*(d.delivery_tag for d in batch))
                elif kind == "heartbeat":
                    self.heartbeats.append(resp.heartbeat)
                    self.heartbeat_arrived.set()
                else:
                    raise AssertionError(f"unexpected {kind} after Opened")
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def send(self, req: pb.SubscribeRequest) -> None:
        self._requests.put_nowait(req)

    def ack(self, *tags: int) -> None:
        self.send(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=tags)))

    def nack(self, *tags: int, delay_ms: int = 0, reason: str = "") -> None:
        self.send(pb.SubscribeRequest(nack=pb.Nack(delivery_tags=tags, delay_ms=delay_ms, reason=reason)))

    def modify_deadline(self, *tags: int, deadline_ms: int) -> None:
        self.send(
            pb.SubscribeRequest(
                modify_deadline=pb.ModifyDeadline(delivery_tags=tags, deadline_ms=deadline_ms)
            )
        )

    async def take(self, n: int, timeout: float = STEP) -> list[pb.Delivery]:
        """The next ``n`` deliveries; fails if they do not all arrive within ``timeout``."""
        out: list[pb.Delivery] = []
        try:
            async with asyncio.timeout(timeout):
                while len(out) < n:
                    out.append(await self.deliveries.get())
        except TimeoutError:
            raise AssertionError(f"got {len(out)} of {n} deliveries within {timeout} s") from None
        return out

    async def collect_for(self, seconds: float) -> list[pb.Delivery]:
        """Whatever arrives within ``seconds`` (to show that nothing does)."""
        out: list[pb.Delivery] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    out.append(await self.deliveries.get())
        return out

    async def wait_ended(self, timeout: float = STEP) -> grpc.aio.AioRpcError | None:
        """Wait for the broker to end the stream; the error it ended with (None: OK)."""
        await asyncio.wait_for(self.ended.wait(), timeout)
        return self.error

    async def close(self) -> None:
        """Cancel the stream, as a host that vanishes would."""
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
