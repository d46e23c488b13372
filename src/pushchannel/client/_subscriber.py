"""One Subscribe stream: open it, read its delivery batches, batch its acks, close it.

:class:`Subscriber` owns exactly one gRPC stream and knows nothing about retrying, so that a
reconnect state machine can wrap it later. :class:`Subscription` is what the async SDK hands
out: an async iterator of :class:`Message` over a Subscriber.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType

import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._types import Message, publish_time_from_us
from pushchannel.client._wire import SubscribeCall, translate
from pushchannel.errors import Cancelled, InternalError, PushChannelError

# Delivery batches read ahead of the application; more stay in HTTP/2 flow control.
_READ_AHEAD = 4
# How long close() waits for the broker to take the last acks before it cancels the stream.
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

    def flush(self, *, final: bool = False) -> None:
        """Send what is pending; runs on the event loop. ``final``: drop whatever comes later."""
        with self._lock:
            if self._closed:
                return
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, {}
            self._scheduled = False
            self._closed = final
        if acks:
            self._send(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=acks)))
        for (delay_ms, reason), tags in nacks.items():
            self._send(
                pb.SubscribeRequest(nack=pb.Nack(delivery_tags=tags, delay_ms=delay_ms, reason=reason))
            )

    def close(self) -> None:
        """Send what is pending, then drop everything that comes later."""
        self.flush(final=True)


class Subscriber:
    """One Subscribe stream. ``open()`` sends the Open and waits for Opened; ``next_batch()``
    returns the next deliveries (``None`` once the stream ended or was closed); ``close()``
    writes the pending acks, ends the stream and its tasks. Not reusable.

    Opening and closing run as tasks of their own, so a caller that gives up waiting on them
    (a timeout) neither cancels the gRPC call half-way nor leaves it half-closed.
    """

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call: SubscribeCall | None = None
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._inbox: asyncio.Queue[list[Message] | PushChannelError | None] = asyncio.Queue(_READ_AHEAD)
        self._batcher: AckBatcher | None = None
        self._opening: asyncio.Task[pb.Opened] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = False
        self._ended: PushChannelError | None = None
        self._eof = False
        self._last_settle_write: float | None = None
        self.opened: pb.Opened | None = None
        self.last_frame_time: float | None = None  # time.monotonic() of the last frame read

    @property
    def closed(self) -> bool:
        """True from the moment close() was called."""
        return self._closed

    async def open(self) -> pb.Opened:
        """Open the stream (once); raises the broker's refusal as a PushChannelError."""
        if self._opening is None:
            if self._closed:
                raise RuntimeError("this subscription is closed")
            self._loop = loop = asyncio.get_running_loop()
            self._opening = loop.create_task(self._open(), name="pushchannel-subscribe-open")
            self._opening.add_done_callback(_retrieve)
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if opening.cancelled() and (current is None or not current.cancelling()):
                raise Cancelled("the subscription was closed while it was opening") from None
            raise

    async def _open(self) -> pb.Opened:
        loop = asyncio.get_running_loop()
        self._call = call = self._start_call()
        try:
            await call.write(pb.SubscribeRequest(open=self._open_request))
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            raise translate(e) from e
        if not isinstance(first, pb.SubscribeResponse) or first.WhichOneof("kind") != "opened":
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
        """The next deliveries, at least one; ``None`` at the end of the stream. Cancelling a
        wait for it loses nothing."""
        if self._ended is not None:
            raise self._ended
        if self._eof or self._closed:
            return None
        if self.opened is None:
            try:
                await self.open()
            except Cancelled:
                if self._closed:
                    return None
                raise
        item = await self._inbox.get()
        if isinstance(item, PushChannelError):
            self._ended = item
            raise item
        if item is None or self._closed:
            self._eof = True
            return None
        return item

    async def _read_loop(self, call: SubscribeCall, sink: AckBatcher | None) -> None:
        # A dedicated reader: a pending call.read() that gets cancelled cancels the whole gRPC
        # call, so the application's waits must never be the ones reading.
        end: PushChannelError | None = None
        try:
            while True:
                response = await call.read()
                if not isinstance(response, pb.SubscribeResponse):  # grpc.aio.EOF
                    break
                self.last_frame_time = time.monotonic()
                # While closing, deliveries are dropped: unacked, the broker sends them again.
                if response.WhichOneof("kind") == "deliveries" and not self._closed:
                    batch = [_message(d, sink) for d in response.deliveries.deliveries]
                    if batch:
                        await self._inbox.put(batch)
                # Heartbeats only refresh last_frame_time; a repeated Opened means nothing.
        except grpc.aio.AioRpcError as e:
            end = translate(e)
        except asyncio.CancelledError:
            if self._closed:  # our own close() cancelled the call or this task
                return
            raise
        if not self._closed:
            await self._inbox.put(end)

    async def _write_loop(self, call: SubscribeCall) -> None:
        while True:
            request = await self._requests.get()
            try:
                if request is None:
                    await call.done_writing()
                    return
                await call.write(request)
                self._last_settle_write = time.monotonic()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream ended; the reader reports why

    async def close(self) -> None:
        """End the stream: write the pending acks, half-close, give the broker up to a second
        to take the acks and end the call, then cancel it. Idempotent; concurrent callers all
        wait for the same close."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    def close_soon(self) -> None:
        """Start close() from any thread without waiting, e.g. for a Subscription that was
        dropped without being closed."""
        if self._closed:
            return
        if self._loop is None:  # never opened: nothing runs, nothing to wait for
            self._closed = True
            if self._on_close is not None:
                self._on_close(self)
            return
        # A closed loop took the stream down with it already.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._start_close)

    def _start_close(self) -> None:
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            if self._opening is not None and not self._opening.done():
                self._opening.cancel()
                with contextlib.suppress(BaseException):
                    await self._opening
            if self._batcher is not None:
                self._batcher.close()
            # Nobody will read what is queued now; making room unblocks the reader, so it can
            # see the broker end the call.
            while not self._inbox.empty():
                self._inbox.get_nowait()
            if self._writer is not None and self._reader is not None:
                await self._half_close(self._writer, self._reader)
            if self._call is not None:
                self._call.cancel()
            for task in (self._writer, self._reader):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            # Wake a caller waiting in next_batch(); it sees `closed` and ends.
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(None)
        finally:
            if self._on_close is not None:
                self._on_close(self)

    async def _half_close(self, writer: asyncio.Task[None], reader: asyncio.Task[None]) -> None:
        # Cancelling the call at once could drop acks the broker has received but not yet
        # processed. After a half-close the broker handles every request before it, then ends
        # the call; wait for that, for a while, when acks went out lately.
        self._requests.put_nowait(None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE):
                await asyncio.shield(writer)
                last = self._last_settle_write
                if last is not None and time.monotonic() - last < _CLOSE_GRACE:
                    await asyncio.shield(reader)


def _retrieve(task: asyncio.Task[pb.Opened]) -> None:
    # A failed open is reported to whoever awaits it; if nobody does, do not log it as lost.
    if not task.cancelled():
        task.exception()


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


class Subscription:
    """An async iterator of :class:`Message` on one channel.

    The stream opens on ``await sub.open()``, on entering ``async with``, or on the first
    ``__anext__``. Breaking out of ``async for``, ``aclose()`` or leaving ``async with`` ends
    the stream (a dropped subscription is closed in the background); deliveries not acked by
    then are delivered again. A timeout on ``anext(sub)`` loses nothing and leaves the stream
    open. Iteration ends quietly when the client is closed, and raises a
    :class:`~pushchannel.PushChannelError` when the broker ends the stream with an error.
    """

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber
        self._buffer: collections.deque[Message] = collections.deque()
        # Holds the Subscriber, not this object: it runs when the application drops us.
        self._finalizer = weakref.finalize(self, subscriber.close_soon)
        self._finalizer.atexit = False

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
        if not self._buffer:
            batch = await self._subscriber.next_batch()
            if batch is None:
                raise StopAsyncIteration
            self._buffer.extend(batch)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """End the stream. Idempotent."""
        self._finalizer.detach()
        self._buffer.clear()
        await self._subscriber.close()

    async def __aenter__(self) -> Subscription:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
