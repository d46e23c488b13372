"""The blocking faces' machinery: a private event loop in a thread, and iterators that carry
batches from an async source on that loop to the application's thread.

Nothing of the protocol lives here: :class:`BlockingSubscription` iterates a reconnecting
:class:`~pushchannel.client._subscriber.Subscriber`, :class:`BlockingSeedStream` a
:class:`~pushchannel.client._seed.SeedStream`, both running on the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from pushchannel._proto import push_pb2
from pushchannel.client._seed import SeedStream
from pushchannel.client._state import ConnectionState, StateListener
from pushchannel.client._subscriber import Subscriber
from pushchannel.client._types import Message

T = TypeVar("T")

# Batches waiting for the application thread before the loop stops taking more.
_MAX_QUEUED_BATCHES = 4
_END = object()
# Longest wait for a stream to close from the application thread (its grace is 1 s).
_STOP_WAIT = 5.0


class LoopThread:
    """An event loop running in a daemon thread of its own, until :meth:`stop`."""

    def __init__(self, name: str, closed_message: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._closed_message = closed_message
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result in this thread."""
        if self.closed:
            coro.close()
            raise RuntimeError(self._closed_message)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, *last_steps: Coroutine[Any, Any, None]) -> None:
        """Run ``last_steps`` in turn, cancel what still runs, stop the loop, join the thread.
        Idempotent; from any thread but the loop's own."""
        with self._lock:
            if self.closed:
                for step in last_steps:
                    step.close()
                return
            self.closed = True
        try:
            for step in (*last_steps, self.loop.shutdown_asyncgens(), _cancel_leftovers()):
                asyncio.run_coroutine_threadsafe(step, self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


async def _cancel_leftovers() -> None:
    """Cancel what still runs on a closing loop, so no task is destroyed pending."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def wait_in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on ``loop`` and wait for it, unless that loop is stopping or gone: then its
    owner is closing and takes care of the stream itself."""
    if loop.is_closed() or not loop.is_running():
        coro.close()
        return
    with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
        asyncio.run_coroutine_threadsafe(coro, loop).result(_STOP_WAIT)


class _Pump(Generic[T]):
    """Runs on the loop: moves batches from ``next_batch`` into a thread-safe queue, pausing
    while the application thread has ``_MAX_QUEUED_BATCHES`` batches to work on."""

    def __init__(
        self, next_batch: Callable[[], Awaitable[list[T] | None]], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.next_batch = next_batch
        self.loop = loop
        self.out: queue.SimpleQueue[list[T] | BaseException | object] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._space = asyncio.Event()

    async def run(self) -> None:
        try:
            while (batch := await self.next_batch()) is not None:
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
        """Let a paused run() go on (to its end, once the source is closed). Any thread."""
        # A closed loop means a closed client, and the subscription went with it.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._space.set)


class _BlockingIterator(Generic[T]):
    """A plain iterator over a pump; one thread iterates it at a time."""

    def __init__(self, pump: _Pump[T], loop: asyncio.AbstractEventLoop) -> None:
        self._pump = pump
        self._loop = loop
        self._pumping: concurrent.futures.Future[None] | None = None
        self._buffer: collections.deque[T] = collections.deque()
        self._done = False

    def _usable(self, item: T) -> bool:
        return True

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            while self._buffer:
                item = self._buffer.popleft()
                if self._usable(item):
                    return item
            if self._done:
                raise StopIteration
            if self._pumping is None:
                if self._loop.is_closed():  # the owner closed, and this iterator with it
                    self._done = True
                    raise StopIteration
                self._pumping = asyncio.run_coroutine_threadsafe(self._pump.run(), self._loop)
            got = self._pump.out.get()
            if isinstance(got, list):
                self._pump.took_batch()
                self._buffer.extend(got)
                continue
            self._done = True
            if isinstance(got, BaseException):
                raise got
            raise StopIteration


def _drop(subscriber: Subscriber, pump: _Pump[Message]) -> None:
    """Finalizer of a BlockingSubscription the application dropped without closing it."""
    subscriber.close_soon()
    pump.wake()


class BlockingSubscription(_BlockingIterator[Message]):
    """A plain iterator of :class:`Message` on one channel (see :class:`Subscription`: it
    reconnects the same way, and its transient faults never reach the ``for`` loop).

    The stream opens on :meth:`open`, on entering ``with``, or on the first ``next()``.
    Breaking out of the ``for`` loop and dropping it, :meth:`close` or leaving ``with`` ends it;
    so does closing the client, which ends the iteration quietly. One thread iterates it at a
    time; any thread may close it.
    """

    def __init__(self, subscriber: Subscriber, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(_Pump(subscriber.next_batch, loop), loop)
        self._subscriber = subscriber
        # Holds the Subscriber and the pump, not this object: runs when the application drops us.
        self._finalizer = weakref.finalize(self, _drop, subscriber, self._pump)
        self._finalizer.atexit = False

    def _usable(self, item: Message) -> bool:
        return self._subscriber.usable(item)

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

    @property
    def state(self) -> ConnectionState:
        """Where the subscription's stream is now."""
        return self._subscriber.state

    def on_state_change(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(change)`` on every state change from now on. It runs on the
        client's event-loop thread: keep it short and thread-safe. Returns a remover."""
        return self._subscriber.add_listener(listener)

    def close(self) -> None:
        """End the stream; a thread iterating it stops. Idempotent."""
        self._finalizer.detach()
        self._buffer.clear()
        if not self._subscriber.closed:
            wait_in_loop(self._loop, self._subscriber.close())
        self._pump.wake()

    def __enter__(self) -> BlockingSubscription:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlockingSeedStream(_BlockingIterator[push_pb2.MessageReply]):
    """The blocking twin of :class:`SeedStream`: a plain iterator of ``MessageReply`` that
    reconnects by itself, on an event loop thread of its own. :meth:`close` (or leaving
    ``with``) ends it and stops the thread."""

    def __init__(self, stream: SeedStream, thread: LoopThread) -> None:
        super().__init__(_Pump(stream.next_batch, thread.loop), thread.loop)
        self._stream = stream
        self._thread = thread

    @property
    def state(self) -> ConnectionState:
        return self._stream.state

    def on_state_change(self, listener: StateListener) -> Callable[[], None]:
        """See :meth:`BlockingSubscription.on_state_change`."""
        return self._stream.on_state_change(listener)

    def close(self) -> None:
        """End the stream and stop its thread; a thread iterating it stops. Idempotent."""
        self._buffer.clear()
        self._thread.stop(self._stream.aclose())
        self._pump.wake()

    def __enter__(self) -> BlockingSeedStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
