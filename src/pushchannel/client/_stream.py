"""One Subscribe call: open it, read its frames, write its acks and lease extensions, end it.

A :class:`Stream` knows nothing of retrying; :class:`~pushchannel.client._subscriber.Subscriber`
opens a new one each time the last one failed. Every way a stream can end is reported as a
:class:`StreamEnd` saying whether trying again may help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import NamedTuple

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._backoff import Clock
from pushchannel.client._settle import AckBatcher, Leases, extension_requests
from pushchannel.client._state import Reconnector
from pushchannel.client._types import Message, RetryPolicy, publish_time_from_us
from pushchannel.client._wire import SubscribeCall, cancelled_under_us, retryable, translate
from pushchannel.errors import Cancelled, InternalError, PushChannelError, Unavailable

# How long a graceful close waits for the broker to take the last acks before it cancels.
_CLOSE_GRACE = 1.0

log = logging.getLogger("pushchannel.client")

_Request = pb.SubscribeRequest | None  # None: done writing
Deliver = Callable[[list[Message]], Awaitable[None]]


class StreamEnd(NamedTuple):
    """Why a stream ended. ``transient``: a new stream may work. ``dead_connection``: the
    connection under it is silent, so the next stream should not use it."""

    error: PushChannelError
    transient: bool
    dead_connection: bool = False


class StreamFailed(Exception):
    """:meth:`Stream.open` did not get ``Opened``."""

    def __init__(self, end: StreamEnd) -> None:
        super().__init__(str(end.error))
        self.end = end


def ended_by(error: grpc.aio.AioRpcError) -> StreamEnd:
    """The end of a stream that failed with ``error``."""
    return StreamEnd(translate(error), retryable(error.code(), publish=False))


# What a stream whose call was cancelled under it (its channel closed) ended with.
CANCELLED_UNDER_US = "the call was cancelled: its connection was closed"


async def serve_forever(
    machine: Reconnector, policy: RetryPolicy, serve_one: Callable[[], Awaitable[StreamEnd]]
) -> PushChannelError:
    """Serve one stream after another, waiting as ``machine`` says between them, until one
    ends with a fault that cannot be retried or the policy's deadline passes: that error."""
    while True:
        machine.connecting()
        end = await serve_one()
        if not end.transient:
            return end.error
        delay = machine.failed(end.error)
        if delay is None:
            return Unavailable(f"gave up reconnecting after {policy.deadline:g} s: {end.error}")
        await asyncio.sleep(delay)


class Stream:
    """One Subscribe call. Deliveries go to ``deliver`` a batch at a time (it may block: the
    reader waits); their acks go through :attr:`sink`, which drops them once the stream ended.
    """

    def __init__(
        self,
        call: SubscribeCall,
        open_request: pb.Open,
        deliver: Deliver,
        *,
        max_lease: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._call = call
        self._open_request = open_request
        self._deliver = deliver
        self._max_lease = max_lease
        self._clock = clock
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._extender: asyncio.Task[None] | None = None
        self._end: asyncio.Future[StreamEnd] | None = None
        self._leases: Leases | None = None
        self._last_settle_write: float | None = None
        self._delivering = False
        self._alive_at = clock()
        self.sink: AckBatcher | None = None
        self.opened: pb.Opened | None = None
        self.last_frame_time: float | None = None  # time.monotonic() of the last frame read
        self.last_heartbeat_us: int | None = None  # the broker's clock in its last heartbeat

    async def open(self) -> pb.Opened:
        """Send Open and wait for Opened; then the reader, writer and lease tasks run.
        Raises :class:`StreamFailed`."""
        loop = asyncio.get_running_loop()
        call = self._call
        try:
            await call.write(pb.SubscribeRequest(open=self._open_request))
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            raise StreamFailed(ended_by(e)) from e
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise
            raise StreamFailed(StreamEnd(Cancelled(CANCELLED_UNDER_US), True)) from None
        if not isinstance(first, pb.SubscribeResponse):  # EOF before Opened: a broker going away
            raise StreamFailed(StreamEnd(Unavailable("the broker ended the stream before it opened"), True))
        if first.WhichOneof("kind") != "opened":
            call.cancel()
            raise StreamFailed(
                StreamEnd(InternalError("the broker answered Subscribe without Opened"), False)
            )
        self.opened = opened = first.opened
        self.last_frame_time = time.monotonic()
        self._alive_at = self._clock()
        self._end = loop.create_future()
        if not self._open_request.auto_ack:
            ack_deadline = (opened.ack_deadline_ms or self._open_request.ack_deadline_ms or 30_000) / 1000
            self._leases = Leases(ack_deadline, self._max_lease)
            self.sink = AckBatcher(loop, self._requests.put_nowait, self._leases.discard)
            self._extender = loop.create_task(
                self._lease_loop(self._leases), name="pushchannel-subscribe-lease"
            )
        self._reader = loop.create_task(self._read_loop(call), name="pushchannel-subscribe-read")
        self._writer = loop.create_task(self._write_loop(call), name="pushchannel-subscribe-write")
        return opened

    @property
    def heartbeat_interval(self) -> float | None:
        """The broker's heartbeat interval in seconds (None: it sends none)."""
        ms = self.opened.heartbeat_interval_ms if self.opened is not None else 0
        return ms / 1000 if ms else None

    def silent_for(self) -> float:
        """Seconds without a frame while the reader was ready for one (not while it waited for
        the application to take the last batch: the broker cannot send through a full pipe)."""
        if self._delivering:
            return 0.0
        return self._clock() - self._alive_at

    def excuse_silence(self) -> None:
        """Count the silence from now (the reader could not have read meanwhile)."""
        self._alive_at = self._clock()

    async def wait_end(self, timeout: float | None) -> StreamEnd | None:
        """How the stream ended, or ``None`` if it still runs after ``timeout`` seconds."""
        assert self._end is not None, "open() first"
        done, _ = await asyncio.wait([self._end], timeout=timeout)
        return self._end.result() if done else None

    def _ended(self, end: StreamEnd) -> None:
        if self._end is not None and not self._end.done():
            self._end.set_result(end)

    async def _read_loop(self, call: SubscribeCall) -> None:
        # A dedicated reader: a pending call.read() that gets cancelled cancels the whole gRPC
        # call, so the application's waits must never be the ones reading.
        sink, leases, clock = self.sink, self._leases, self._clock
        try:
            while True:
                response = await call.read()
                if not isinstance(response, pb.SubscribeResponse):  # grpc.aio.EOF
                    self._ended(StreamEnd(Unavailable("the broker ended the stream"), True))
                    return
                self.last_frame_time = time.monotonic()
                self._alive_at = clock()
                kind = response.WhichOneof("kind")
                if kind == "deliveries":
                    batch = _messages(response.deliveries.deliveries, sink)
                    if leases is not None:
                        leases.add((m.delivery_tag for m in batch), self._alive_at)
                    if batch:
                        self._delivering = True
                        try:
                            await self._deliver(batch)
                        finally:
                            self._delivering = False
                            self._alive_at = clock()
                elif kind == "heartbeat":
                    self.last_heartbeat_us = response.heartbeat.server_time_us
                # A repeated Opened means nothing.
        except grpc.aio.AioRpcError as e:
            self._ended(ended_by(e))
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise
            self._ended(StreamEnd(Cancelled(CANCELLED_UNDER_US), True))

    async def _write_loop(self, call: SubscribeCall) -> None:
        while True:
            request = await self._requests.get()
            try:
                if request is None:
                    await call.done_writing()
                    return
                await call.write(request)
                if request.WhichOneof("kind") != "modify_deadline":
                    self._last_settle_write = time.monotonic()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream ended; the reader reports why
            except asyncio.CancelledError:
                if not cancelled_under_us():
                    raise
                return  # likewise

    async def _lease_loop(self, leases: Leases) -> None:
        while True:
            await asyncio.sleep(leases.period)
            for request in extension_requests(leases.due(self._clock())):
                self._requests.put_nowait(request)

    async def close(self) -> None:
        """End the stream gracefully: write the pending acks, half-close, give the broker up
        to a second to take them and end the call, then cancel it."""
        if self.sink is not None:
            self.sink.close()
        self._stop_leases()
        reader, writer = self._reader, self._writer
        if reader is not None and writer is not None and not writer.done():
            # Cancelling the call at once could drop acks the broker has received but not yet
            # processed. After a half-close the broker handles every request before it, then
            # ends the call; wait for that, for a while, when acks went out lately.
            self._requests.put_nowait(None)
            started = time.monotonic()
            await asyncio.wait([writer], timeout=_CLOSE_GRACE)
            last = self._last_settle_write
            if last is not None and time.monotonic() - last < _CLOSE_GRACE:
                await asyncio.wait([reader], timeout=max(0.0, started + _CLOSE_GRACE - time.monotonic()))
        await self.kill()

    async def kill(self) -> None:
        """End the stream now: cancel the call and its tasks; later acks are dropped."""
        if self.sink is not None:
            self.sink.close()
        self._stop_leases()
        self._call.cancel()
        tasks = [t for t in (self._extender, self._reader, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # unlike `await task`, lets our own cancellation through
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                # A bug: say so, but let the subscription go on with a new stream.
                log.error("pushchannel: a subscribe task failed", exc_info=error)
        # A cancelled task keeps its CancelledError, whose traceback holds the task's frames,
        # which hold this stream: let go of the tasks, or every closed stream is a reference
        # cycle of some 50 objects that only the collector's full passes free.
        self._extender = self._reader = self._writer = None
        self._ended(StreamEnd(Unavailable("the stream was closed"), True))

    def _stop_leases(self) -> None:
        if self._extender is not None:
            self._extender.cancel()


def _messages(deliveries: Iterable[pb.Delivery], sink: AckBatcher | None) -> list[Message]:
    """One frame's deliveries as Messages. Per message, the costly parts are skipped where
    they can be: an empty attribute map is not copied (copying it costs as much as the rest),
    and messages published together share one publish-time datetime."""
    out: list[Message] = []
    times: dict[int, datetime] = {}
    for d in deliveries:
        us = d.publish_time_us
        publish_time = times.get(us)
        if publish_time is None:
            publish_time = times[us] = publish_time_from_us(us)
        attributes = d.attributes
        out.append(
            Message(
                channel=d.channel,
                seq=d.seq,
                id=d.id,
                payload=d.payload,
                attributes=dict(attributes) if len(attributes) else {},
                publish_time=publish_time,
                attempt=d.attempt,
                delivery_tag=d.delivery_tag,
                sink=sink,
            )
        )
    return out
