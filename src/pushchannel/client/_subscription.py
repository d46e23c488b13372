"""What the async SDK hands out for a subscription: :class:`Subscription`, an async iterator of
:class:`Message` over a reconnecting :class:`Subscriber`."""

from __future__ import annotations

import collections
import weakref
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from pushchannel.client._state import ConnectionState, StateChange, StateListener
from pushchannel.client._subscriber import Subscriber
from pushchannel.client._types import Message


class Subscription:
    """An async iterator of :class:`Message` on one channel.

    The stream opens on ``await sub.open()``, on entering ``async with``, or on the first
    ``__anext__``. When the stream fails with a transient fault (the broker restarting, a
    connection cut, a proxy gone silent) the subscription reopens it in the same group with
    backoff; the iteration does not notice, except that unacked messages come again
    (``attempt`` + 1). Breaking out of ``async for``, ``aclose()`` or leaving ``async with``
    ends the stream (a dropped subscription is closed in the background); deliveries not acked
    by then are delivered again. A timeout on ``anext(sub)`` loses nothing and leaves the
    stream open. Iteration ends quietly when the client is closed, and raises a
    :class:`~pushchannel.PushChannelError` for a fault that cannot be retried (bad channel
    name, permission) or once the retry policy's deadline has passed.
    """

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber
        self._buffer: collections.deque[Message] = collections.deque()
        # Holds the Subscriber, not this object: it runs when the application drops us.
        self._finalizer = weakref.finalize(self, subscriber.close_soon)
        self._finalizer.atexit = False

    async def open(self) -> None:
        """Open the stream now (it opens by itself on the first message otherwise), so that
        a subscription starting at ``"new"`` sees everything published after this returns.
        Waits, retrying, until the broker answers."""
        await self._subscriber.open()

    @property
    def group(self) -> str | None:
        """The group's name as the broker reported it (broadcast: the anonymous group)."""
        opened = self._subscriber.opened
        return opened.group if opened is not None else None

    @property
    def last_frame_time(self) -> float | None:
        """``time.monotonic()`` when the broker last sent anything on the current stream,
        heartbeats included (``None`` between streams)."""
        return self._subscriber.last_frame_time

    @property
    def state(self) -> ConnectionState:
        """Where the subscription's stream is now."""
        return self._subscriber.state

    def on_state_change(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(change)`` on every :class:`StateChange` from now on (on the event
        loop; keep it short). Returns a function that removes it."""
        return self._subscriber.add_listener(listener)

    def state_changes(self) -> AsyncIterator[StateChange]:
        """The :class:`StateChange` s from now on, as an async iterator that ends after
        ``CLOSED``."""
        return self._subscriber.state_changes()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        subscriber, buffer = self._subscriber, self._buffer
        while True:
            while buffer:
                message = buffer.popleft()
                if subscriber.usable(message):
                    return message
            batch = await subscriber.next_batch()
            if batch is None:
                raise StopAsyncIteration
            buffer.extend(batch)

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
