"""One Subscribe stream: open it, read its delivery batches, batch its acks, close it.

:class:`Subscriber` owns exactly one gRPC stream and knows nothing about retrying, so that a
reconnect state machine can wrap it later. :class:`Subscription` is what the async SDK hands
out: an async iterator of :class:`Message` over a Subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from types import TracebackType

import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._types import Message, publish_time_from_us
from pushchannel.client._wire import SubscribeCall, translate
from pushchannel.errors import InternalError, PushChannelError

# Delivery batches read ahead of the application; more stay in HTTP/2 flow control.
_READ_AHEAD = 4
# How long close() waits for the last acks to be written before it cancels the stream.
_CLOSE_GRACE = 1.0

_Request = pb.SubscribeRequest | None  # None: done writing


class AckBatcher:
    """Collects acks and nacks from any thread and sends them as one request per kind once
    per event-loop turn, instead of one request per message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[pb.SubscribeRequest], None]) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._send = send
        self._lock = threading.Lock()
        self._acks: list[int] = []
        self._nacks: dict[tuple[int, str], list[int]] = {}
        self._scheduled = False
        self._closed = False

    def ack(self, tag: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._acks.append(tag)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()

    def nack(self, tag: int, delay: float, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._nacks.setdefault((round(delay * 1000), reason), []).append(tag)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()

    def _schedule(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self.flush)
        else:
            # The loop may be gone already: then so is the stream, and the ack is moot.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """Send what is pending; runs on the event loop."""
        with self._lock:
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, {}
            self._scheduled = False
            if self._closed:
                return
        if acks:
            self._send(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=acks)))
        for (delay_ms, reason), tags in nacks.items():
            self._send(pb.SubscribeRequest(nack=pb.Nack(delivery_tags=tags, delay_ms=delay_ms, reason=reason)))

    def close(self) -> None:
        """Flush what is pending, then drop everything that comes later."""
        self.flush()
        with self._lock:
            self._closed = True


class Subscriber:
    """One Subscribe stream. ``open()`` sends the Open and waits for Opened; ``next_batch()``
    returns the next deliveries (``None`` once the stream ended or was closed); ``close()``
    writes the pending acks, ends the stream and its tasks. Not reusable."""

    def __init__(
        self,
        start_call: Callable[[], SubscribeCall],
        open_request: pb.Open,
        *,
        on_close: Callable[[Subscriber], None] | None = None,
    ) -> None:
        self._start_call = start_call
        self._on_close = on_close
        self._open_request = open_request
        self._call: SubscribeCall | None = None
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._inbox: asyncio.Queue[list[Message] | PushChannelError | None] = asyncio.Queue(_READ_AHEAD)
        self._batcher: AckBatcher | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._ended: PushChannelError | None = None
        self._eof = False
        self.opened: pb.Opened | None = None
        self.last_frame_time: float | None = None  # time.monotonic() of the last frame read

    @property
    def closed(self) -> bool:
        return self._closing is not None

    async def open(self) -> pb.Opened:
        """Open the stream (once); raises the broker's refusal as a PushChannelError."""
        if self.opened is not None:
            return self.opened
        if self._call is not None or self.closed:
            raise RuntimeError("this subscription was already opened or closed")
        loop = asyncio.get_running_loop()
        self._call = call = self._start_call()
        try:
            await call.write(pb.SubscribeRequest(open=self._open_request))
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            raise translate(e) from e
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "opened":
            call.cancel()
            raise InternalError("the broker answered Subscribe without Opened")
        self.last_frame_time = time.monotonic()
        self.opened = first.opened
        sink = None if self._open_request.auto_ack else AckBatcher(loop, self._requests.put_nowait)
        self._batcher = sink
        self._reader = loop.create_task(self._read_loop(call, sink), name="pushchannel-subscribe-read")
        self._writer = loop.create_task(self._write_loop(call), name="pushchannel-subscribe-write")
        return self.opened

    async def next_batch(self) -> list[Message] | None:
        """The next deliveries, at least one; ``None`` at the end of the stream."""
        if self._ended is not None:
            raise self._ended
        if self._eof or self.closed:
            return None
        if self.opened is None:
            await self.open()
        item = await self._inbox.get()
        if isinstance(item, PushChannelError):
            self._ended = item
            raise item
        if item is None or self.closed:
            self._eof = True
            return None
        return item

    async def _read_loop(self, call: SubscribeCall, sink: AckBatcher | None) -> None:
        # A dedicated reader, so that a caller who cancels its wait for the next message
        # (asyncio.wait_for / timeout) does not cancel the whole gRPC call with it.
        end: PushChannelError | None = None
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self.last_frame_time = time.monotonic()
                if response.WhichOneof("kind") == "deliveries":
                    batch = [_message(d, sink) for d in response.deliveries.deliveries]
                    if batch:
                        await self._inbox.put(batch)
                # Heartbeats only refresh last_frame_time; a repeated Opened means nothing.
        except grpc.aio.AioRpcError as e:
            end = translate(e)
        except asyncio.CancelledError:
            if self.closed:  # our own close() cancelled the call or this task
                return
            raise
        await self._inbox.put(end)

    async def _write_loop(self, call: SubscribeCall) -> None:
        while True:
            request = await self._requests.get()
            try:
                if request is None:
                    await call.done_writing()
                    return
                await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream ended; the reader reports why

    async def close(self) -> None:
        """End the stream: write pending acks (waiting at most a second), then cancel it.
        Idempotent; concurrent callers all wait for the same close."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            try:
                await self._close()
            finally:
                self._closing.set_result(None)
                if self._on_close is not None:
                    self._on_close(self)
        else:
            await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        if self._writer is not None:
            self._requests.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), _CLOSE_GRACE)
        if self._call is not None:
            self._call.cancel()
        for task in (self._writer, self._reader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Wake a caller waiting in next_batch(); it will see `closed` and end.
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(None)


def _message(d: pb.Delivery, sink: AckBatcher | None) -> Message:
    return Message(
        channel=d.channel,
        seq=d.seq,
        id=d.id,
        payload=d.payload,
        attributes=dict(d.attributes),
        publish_time=publish_time_from_us(d.publish_time_us),
        attempt=d.attempt,
        delivery_tag=d.delivery_tag,
        sink=sink,
    )


async def _iterate(subscriber: Subscriber) -> AsyncGenerator[Message, None]:
    # A module-level generator holding only the Subscriber: when the Subscription is dropped
    # after a `break`, this generator is dropped with it, and asyncio's async-generator
    # finalizer runs the `finally` below, closing the stream.
    try:
        while (batch := await subscriber.next_batch()) is not None:
            for message in batch:
                yield message
    finally:
        await subscriber.close()


class Subscription:
    """An async iterator of :class:`Message` on one channel.

    The stream opens on ``await sub.open()``, on entering ``async with``, or on the first
    ``__anext__``. Breaking out of ``async for``, ``aclose()`` or leaving ``async with`` ends
    the stream; deliveries not acked by then are delivered again. Iteration ends quietly when
    the client is closed and raises a :class:`~pushchannel.PushChannelError` when the broker
    ends the stream with an error.
    """

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber
        self._messages = _iterate(subscriber)

    async def open(self) -> None:
        """Open the stream now (it opens by itself on the first message otherwise), so that
        a subscription starting at ``"new"`` sees everything published after this returns."""
        await self._subscriber.open()

    @property
    def group(self) -> str | None:
        """The group's name as the broker reported it (broadcast: the anonymous group)."""
        opened = self._subscriber.opened
        return opened.group if opened is not None else None

    @property
    def last_frame_time(self) -> float | None:
        """``time.monotonic()`` when the broker last sent anything, heartbeats included."""
        return self._subscriber.last_frame_time

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self._messages.__anext__()

    async def aclose(self) -> None:
        await self._subscriber.close()
        # While another task is inside __anext__, the generator cannot be closed from here;
        # that task sees the closed stream and ends it by itself.
        with contextlib.suppress(RuntimeError):
            await self._messages.aclose()

    async def __aenter__(self) -> Subscription:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
