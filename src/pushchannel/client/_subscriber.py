"""A subscription that survives the network: one :class:`Stream` after another.

:class:`Subscriber` runs one task that opens a stream, watches it (a broker that sends no
frame for three heartbeat intervals is taken for gone, and so is the connection under it), and
when the stream fails with a transient fault asks its :class:`Reconnector` how long to wait
before opening the next. Deliveries from every stream go to one inbox that the application
reads, so a reconnect is invisible to it; faults that cannot be retried end the inbox with
the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import NamedTuple

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._backoff import Clock, Random
from pushchannel.client._state import ConnectionState, Reconnector, StateChange, StateListener
from pushchannel.client._stream import Stream, StreamEnd, StreamFailed, serve_forever
from pushchannel.client._types import Message, RetryPolicy, is_stale
from pushchannel.client._wire import Connection, ConnectionPool, Metadata
from pushchannel.errors import Cancelled, InternalError, PushChannelError, Unavailable

# A broker that sends nothing for this many heartbeat intervals is taken for gone.
HEARTBEAT_MISSES = 3
# Delivery batches read ahead of an auto-ack application (other subscriptions are bounded by
# max_in_flight at the broker, and read eagerly so that their leases can be extended).
_READ_AHEAD = 4


class _End(NamedTuple):
    error: PushChannelError | None  # None: closed by the application


class Subscriber:
    """One subscription, reopened in the same group whenever its stream fails transiently.

    ``open()`` waits for the first ``Opened`` (or the first fault that cannot be retried);
    ``next_batch()`` returns the next deliveries (``None`` once closed); ``close()`` writes the
    pending acks and ends the current stream. Deliveries of a stream that failed, not yet
    handed to the application, are dropped: the broker delivers them again on the next one.

    A broadcast subscription has no durable group to come back to: it reopens from the seq
    after the last one it received, or, before any delivery, from the broker's time in its
    last heartbeat, or else from its original ``start``.
    """

    def __init__(
        self,
        connections: ConnectionPool,
        open_request: pb.Open,
        *,
        metadata: Metadata,
        policy: RetryPolicy,
        max_lease: float = 3600.0,
        listeners: Iterable[StateListener] = (),
        on_close: Callable[[Subscriber], None] | None = None,
        random: Random = _random.random,
        clock: Clock = time.monotonic,
    ) -> None:
        self._connections = connections
        self._connection: Connection | None = None  # leased while the subscription runs
        self._open_request = open_request
        self._metadata = metadata
        self._policy = policy
        self._max_lease = max_lease
        self._on_close = on_close
        self._clock = clock
        self._broadcast = open_request.mode == pb.Open.BROADCAST
        self._auto_ack = open_request.auto_ack
        # Only the broker's redelivery makes a dead stream's deliveries safe to drop.
        self._drops_stale = not self._broadcast and not self._auto_ack
        self._machine = Reconnector(
            _subject(open_request), policy, listeners=listeners, random=random, clock=clock
        )
        self._inbox: asyncio.Queue[list[Message] | _End] = asyncio.Queue()
        self._space = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first_open: asyncio.Future[pb.Opened] | None = None
        self._stream: Stream | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = False
        self._failed: PushChannelError | None = None
        self._eof = False
        self._last_seq = 0
        self._resume_time_us: int | None = None
        self.opened: pb.Opened | None = None

    # -- what the application's side sees --------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True from the moment close() was called."""
        return self._closed

    @property
    def state(self) -> ConnectionState:
        return self._machine.state

    @property
    def last_frame_time(self) -> float | None:
        stream = self._stream
        return stream.last_frame_time if stream is not None else None

    def add_listener(self, listener: StateListener) -> Callable[[], None]:
        return self._machine.add_listener(listener)

    def state_changes(self) -> AsyncIterator[StateChange]:
        return self._machine.changes()

    def usable(self, message: Message) -> bool:
        """False for a delivery whose stream failed before the application got it: the broker
        delivers it again on the next stream. Any thread."""
        return not (self._drops_stale and is_stale(message))

    async def open(self) -> pb.Opened:
        """Start the subscription and wait until its first stream is open; raises the fault
        that cannot be retried (or :class:`~pushchannel.Unavailable` once the retry deadline
        passed) as a PushChannelError."""
        first_open = self._start()
        try:
            return await asyncio.shield(first_open)
        except PushChannelError as e:
            # The future keeps ``e`` for later callers. Raised from here, ``e`` would hold this
            # frame (and so this subscriber, and the future): a reference cycle. Raise a copy.
            e.__traceback__ = None
            raise type(e)(e.message) from e.__cause__

    async def next_batch(self) -> list[Message] | None:
        """The next deliveries, at least one; ``None`` once closed. Cancelling a wait for it
        loses nothing."""
        if self._failed is not None:
            raise self._failed
        if self._eof or self._closed:
            return None
        self._start()
        while True:
            item = await self._inbox.get()
            self._space.set()
            if isinstance(item, _End):
                if item.error is None or self._closed:
                    self._eof = True
                    return None
                self._failed = item.error
                raise item.error
            if self._closed:
                self._eof = True
                return None
            batch = [m for m in item if self.usable(m)] if self._drops_stale else item
            if batch:
                return batch

    # -- the reconnect loop ----------------------------------------------------------------------
    def _start(self) -> asyncio.Future[pb.Opened]:
        if self._first_open is None:
            if self._closed:
                raise RuntimeError("this subscription is closed")
            self._loop = loop = asyncio.get_running_loop()
            self._first_open = loop.create_future()
            self._first_open.add_done_callback(_retrieve)
            self._runner = loop.create_task(self._run(), name="pushchannel-subscribe-run")
        return self._first_open

    async def _run(self) -> None:
        error: PushChannelError
        try:
            connection = self._connection = self._connections.lease()
            error = await serve_forever(self._machine, self._policy, lambda: self._serve_one(connection))
        except asyncio.CancelledError:
            raise  # close() takes it from here
        except Exception as e:  # a bug: end the subscription visibly rather than spin
            error = InternalError(f"the subscription failed: {e!r}")
            error.__cause__ = e
        self._release()  # its last stream has ended
        self._machine.closed(error)
        self._settle_first_open(error)
        self._inbox.put_nowait(_End(error))

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._connections.release(connection)

    async def _serve_one(self, connection: Connection) -> StreamEnd:
        """Open one stream on ``connection`` and serve it until it ends; how it ended."""
        generation, broker = connection.broker()
        stream = Stream(
            broker.subscribe(None, metadata=self._metadata),
            self._next_open_request(),
            self._deliver,
            max_lease=self._max_lease,
            clock=self._clock,
        )
        self._stream = stream
        try:
            end = await self._open_and_watch(stream)
        except asyncio.CancelledError:
            raise  # closing: close() ends the stream, gracefully if it opened
        except BaseException:
            await stream.kill()
            raise
        await stream.kill()
        self._stream = None
        if end.dead_connection:
            connection.replace(generation)
        if stream.last_heartbeat_us is not None:
            self._resume_time_us = stream.last_heartbeat_us
        return end

    async def _open_and_watch(self, stream: Stream) -> StreamEnd:
        timeout = self._policy.attempt_timeout
        try:
            async with asyncio.timeout(timeout):
                opened = await stream.open()
        except StreamFailed as e:
            return e.end
        except TimeoutError:
            return StreamEnd(Unavailable(f"no answer to Subscribe within {timeout:g} s"), True, True)
        self.opened = opened
        self._machine.ready()
        self._settle_first_open(None)
        return await self._watch(stream)

    async def _watch(self, stream: Stream) -> StreamEnd:
        """Wait for the stream to end, or for the broker to miss three heartbeats."""
        interval = stream.heartbeat_interval
        if interval is None:  # a broker that sends none: only gRPC keepalive watches
            end = await stream.wait_end(None)
            assert end is not None
            return end
        limit = HEARTBEAT_MISSES * interval
        while True:
            silent = stream.silent_for()
            if silent >= limit:
                message = f"no frame from the broker for {silent:.1f} s (heartbeat every {interval:g} s)"
                return StreamEnd(Unavailable(message), True, True)
            wait = limit - silent
            started = self._clock()
            end = await stream.wait_end(wait)
            if end is not None:
                return end
            if self._clock() - started > wait + interval:
                # The event loop was stalled (by the application, or a paused process): the
                # reader could not read either, so the silence proves nothing. Start over.
                stream.excuse_silence()

    def _next_open_request(self) -> pb.Open:
        if not self._broadcast or (not self._last_seq and self._resume_time_us is None):
            return self._open_request
        request = pb.Open()
        request.CopyFrom(self._open_request)
        if self._last_seq:
            request.start_seq = self._last_seq + 1
        elif self._resume_time_us is not None:
            request.start_time_ms = self._resume_time_us // 1000
        return request

    async def _deliver(self, batch: list[Message]) -> None:
        if self._auto_ack:
            while self._inbox.qsize() >= _READ_AHEAD:
                self._space.clear()
                await self._space.wait()
        self._inbox.put_nowait(batch)
        if self._broadcast:
            self._last_seq = max(self._last_seq, max(m.seq for m in batch))

    def _settle_first_open(self, error: PushChannelError | None) -> None:
        first_open = self._first_open
        if first_open is None or first_open.done():
            return
        if error is not None:
            first_open.set_exception(error)
        elif self.opened is not None:
            first_open.set_result(self.opened)

    # -- closing ---------------------------------------------------------------------------------
    async def close(self) -> None:
        """End the subscription: write the pending acks, end the stream (giving the broker up
        to a second to take the acks), stop reconnecting. Idempotent; concurrent callers all
        wait for the same close."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    def close_soon(self) -> None:
        """Start close() from any thread without waiting, e.g. for a subscription that was
        dropped without being closed."""
        if self._closed:
            return
        if self._loop is None:  # never started: nothing runs, nothing to wait for
            self._closed = True
            self._machine.closed()
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
            runner, self._runner = self._runner, None  # no cycle through its CancelledError
            if runner is not None and not runner.done():
                runner.cancel()
                await asyncio.wait([runner])
            stream, self._stream = self._stream, None
            if stream is not None:
                await (stream.close() if stream.opened is not None else stream.kill())
            self._machine.closed()
            if self._first_open is not None and not self._first_open.done():
                self._first_open.set_exception(Cancelled("the subscription was closed while it was opening"))
            # Nobody will read what is queued now; wake a caller waiting in next_batch().
            while not self._inbox.empty():
                self._inbox.get_nowait()
            self._inbox.put_nowait(_End(None))
            self._space.set()
        finally:
            self._release()
            if self._on_close is not None:
                self._on_close(self)


def _retrieve(future: asyncio.Future[pb.Opened]) -> None:
    # A failed open is reported to whoever awaits it; if nobody does, do not log it as lost.
    if not future.cancelled():
        future.exception()


def _subject(request: pb.Open) -> str:
    if request.mode == pb.Open.BROADCAST:
        return f"subscribe {request.channel} (broadcast)"
    return f"subscribe {request.channel} (group {request.group or 'default'})"
