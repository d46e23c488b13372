"""The blocking client: :class:`Client`, a thin face over :class:`AsyncClient`.

Each Client runs an AsyncClient on a private event loop in one daemon thread and calls into it
with :func:`asyncio.run_coroutine_threadsafe`; nothing of the protocol is written twice.
Subscriptions cross the thread boundary a delivery batch at a time, not a message at a time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
import weakref
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._async import AsyncClient, Start, _open_request
from pushchannel.client._subscriber import Subscriber
from pushchannel.client._types import Message, OutgoingMessage, PublishResult, RetryPolicy

T = TypeVar("T")

# Delivery batches waiting for the application thread before the loop stops reading.
_MAX_QUEUED_BATCHES = 4
_END = object()
# Longest wait for a stream to close from the application thread (its grace is 1 s).
_STOP_WAIT = 5.0


class Client:
    """A blocking connection to a pushchannel broker: the methods of :class:`AsyncClient`
    without ``await``. Thread-safe. Use it as ``with Client(...) as client:`` or call
    :meth:`close`, which also ends the subscriptions other threads are iterating."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        tls: grpc.ChannelCredentials | bool | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._aio = AsyncClient(target, token=token, tls=tls, retry=retry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pushchannel-client", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def target(self) -> str:
        return self._aio.target

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("this pushchannel client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def publish(
        self,
        channel: str,
        payload: bytes | str,
        *,
        attributes: Mapping[str, str] | None = None,
        id: str | None = None,
        ttl: float | None = None,
    ) -> PublishResult:
        """See :meth:`AsyncClient.publish`."""
        return self._run(self._aio.publish(channel, payload, attributes=attributes, id=id, ttl=ttl))

    def publish_many(
        self, channel: str, messages: Iterable[bytes | str | OutgoingMessage]
    ) -> list[PublishResult]:
        """See :meth:`AsyncClient.publish_many`. ``messages`` is read in this thread."""
        return self._run(self._aio.publish_many(channel, list(messages)))

    def subscribe(
        self,
        channel: str,
        *,
        group: str = "default",
        broadcast: bool = False,
        start: Start = None,
        max_in_flight: int = 100,
        ack_deadline: float = 30.0,
        auto_ack: bool = False,
    ) -> BlockingSubscription:
        """See :meth:`AsyncClient.subscribe`; returns a plain iterator of :class:`Message`
        whose ``ack()`` and ``nack()`` are ordinary calls."""
        request = _open_request(channel, group, broadcast, start, max_in_flight, ack_deadline, auto_ack)
        subscriber = self._run(_make_subscriber(self._aio, request))
        return BlockingSubscription(subscriber, self._loop)

    def close(self) -> None:
        """Close every subscription and the connection, then stop the loop thread.
        Idempotent; safe from any thread but the client's own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            for step in (self._aio.close(), self._loop.shutdown_asyncgens(), _cancel_leftovers()):
                asyncio.run_coroutine_threadsafe(step, self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _make_subscriber(client: AsyncClient, request: pb.Open) -> Subscriber:
    return client._subscriber(request)


async def _cancel_leftovers() -> None:
    """Cancel what still runs on a closing client's loop, so no task is destroyed pending."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _wait_in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a client's loop and wait for it, unless that loop is stopping or gone:
    then the client is closing and takes care of the stream itself."""
    if loop.is_closed() or not loop.is_running():
        coro.close()
        return
    with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
        asyncio.run_coroutine_threadsafe(coro, loop).result(_STOP_WAIT)


class _Pump:
    """Runs on the loop: moves delivery batches from a Subscriber into a thread-safe queue,
    pausing while the application thread has ``_MAX_QUEUED_BATCHES`` batches to work on."""

    def __init__(self, subscriber: Subscriber, loop: asyncio.AbstractEventLoop) -> None:
        self.subscriber = subscriber
        self.loop = loop
        self.out: queue.SimpleQueue[list[Message] | BaseException | object] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._space = asyncio.Event()

    async def run(self) -> None:
        try:
            while (batch := await self.subscriber.next_batch()) is not None:
                with self._lock:
                    self._queued += 1
                    full = self._queued >= _MAX_QUEUED_BATCHES
                    if full:
                        self._space.clear()
                self.out.put(batch)
                if full:
                    await self._space.wait()
            self.out.put(_END)
        except asyncio.CancelledError:
            self.out.put(_END)
            raise
        except Exception as e:
            self.out.put(e)

    def took_batch(self) -> None:
        """Called by the application thread after taking a batch off the queue."""
        with self._lock:
            self._queued -= 1
            wake = self._queued == _MAX_QUEUED_BATCHES - 1
        if wake:
            self.wake()

    def wake(self) -> None:
        """Let a paused run() go on (to its end, once the subscriber is closed). Any thread."""
        # A closed loop means a closed client, and the subscription went with it.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._space.set)


def _drop(subscriber: Subscriber, pump: _Pump) -> None:
    """Finalizer of a BlockingSubscription the application dropped without closing it."""
    subscriber.close_soon()
    pump.wake()


class BlockingSubscription:
    """A plain iterator of :class:`Message` on one channel (see :class:`Subscription`).

    The stream opens on :meth:`open`, on entering ``with``, or on the first ``next()``.
    Breaking out of the ``for`` loop and dropping it, :meth:`close` or leaving ``with`` ends it;
    so does closing the client, which ends the iteration quietly. One thread iterates it at a
    time; any thread may close it.
    """

    def __init__(self, subscriber: Subscriber, loop: asyncio.AbstractEventLoop) -> None:
        self._subscriber = subscriber
        self._loop = loop
        self._pump = _Pump(subscriber, loop)
        self._pumping: concurrent.futures.Future[None] | None = None
        self._buffer: collections.deque[Message] = collections.deque()
        self._done = False
        # Holds the Subscriber and the pump, not this object: runs when the application drops us.
        self._finalizer = weakref.finalize(self, _drop, subscriber, self._pump)
        self._finalizer.atexit = False

    def open(self) -> None:
        """Open the stream now (see :meth:`Subscription.open`)."""
        if self._loop.is_closed():
            raise RuntimeError("this pushchannel client is closed")
        asyncio.run_coroutine_threadsafe(self._subscriber.open(), self._loop).result()

    @property
    def group(self) -> str | None:
        """The group's name as the broker reported it (broadcast: the anonymous group)."""
        opened = self._subscriber.opened
        return opened.group if opened is not None else None

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        if self._buffer:
            return self._buffer.popleft()
        if self._done:
            raise StopIteration
        if self._pumping is None:
            if self._loop.is_closed():  # the client closed, and this subscription with it
                self._done = True
                raise StopIteration
            self._pumping = asyncio.run_coroutine_threadsafe(self._pump.run(), self._loop)
        item = self._pump.out.get()
        if isinstance(item, list):
            self._pump.took_batch()
            self._buffer.extend(item)
            return self._buffer.popleft()
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

    def close(self) -> None:
        """End the stream; a thread iterating it stops. Idempotent."""
        self._finalizer.detach()
        self._buffer.clear()
        if not self._subscriber.closed:
            _wait_in_loop(self._loop, self._subscriber.close())
        self._pump.wake()

    def __enter__(self) -> BlockingSubscription:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
