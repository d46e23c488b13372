"""The seed's ``PushMessageStream`` loop with the SDK's reconnect behaviour.

For users who keep the seed's ``push.proto`` (service ``MessageSync``): :func:`seed_stream`
yields the very ``MessageReply`` objects their loop already handles, and reopens the stream
with the same backoff, state machine and state callbacks as :class:`AsyncClient`'s
subscriptions. The seed protocol has no acks and no heartbeats: the broker counts a message
delivered once it is written to the stream, and gRPC keepalive (20 s + 10 s) notices a dead
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import grpc
import grpc.aio

from pushchannel._proto import push_pb2
from pushchannel.client._backoff import Clock, Random
from pushchannel.client._state import ConnectionState, Reconnector, StateChange, StateListener
from pushchannel.client._stream import CANCELLED_UNDER_US, StreamEnd, ended_by, serve_forever
from pushchannel.client._types import RetryPolicy
from pushchannel.client._wire import Connection, call_metadata, cancelled_under_us
from pushchannel.errors import Cancelled, InternalError, PushChannelError, Unavailable

_METHOD = "/MessageSync/PushMessageStream"
_READ_AHEAD = 64  # replies read ahead of the application
_Item = push_pb2.MessageReply | PushChannelError | None

SeedCall = grpc.aio.UnaryStreamCall[push_pb2.ConnRequest, push_pb2.MessageReply]


class SeedStream:
    """An async iterator of ``push_pb2.MessageReply`` on one channel, reopened after transient
    faults. It opens on the first ``__anext__`` (or ``async with``); :meth:`aclose` ends it.
    Iteration raises a :class:`~pushchannel.PushChannelError` only for a fault that cannot be
    retried (a bad channel name, a refused token) or when the retry deadline has passed."""

    def __init__(
        self,
        target: str,
        channel: str,
        *,
        token: str | None = None,
        tls: grpc.ChannelCredentials | bool | None = None,
        retry: RetryPolicy | None = None,
        on_state_change: StateListener | None = None,
        random: Random = _random.random,
        clock: Clock = time.monotonic,
    ) -> None:
        self.channel = channel
        self._policy = retry or RetryPolicy()
        self._connection = Connection(target, tls, self._policy)
        self._metadata = call_metadata(token)
        listeners = (on_state_change,) if on_state_change else ()
        self._machine = Reconnector(
            f"seed stream {channel}", self._policy, listeners=listeners, random=random, clock=clock
        )
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue(_READ_AHEAD)
        self._runner: asyncio.Task[None] | None = None
        self._done = False

    @property
    def state(self) -> ConnectionState:
        return self._machine.state

    def on_state_change(self, listener: StateListener) -> Callable[[], None]:
        """See :meth:`Subscription.on_state_change`."""
        return self._machine.add_listener(listener)

    def state_changes(self) -> AsyncIterator[StateChange]:
        return self._machine.changes()

    def __aiter__(self) -> SeedStream:
        return self

    async def __anext__(self) -> push_pb2.MessageReply:
        if self._done:
            raise StopAsyncIteration
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="pushchannel-seed-run")
        item = await self._inbox.get()
        if isinstance(item, push_pb2.MessageReply):
            return item
        self._done = True
        if item is None:
            raise StopAsyncIteration
        raise item

    async def next_batch(self) -> list[push_pb2.MessageReply] | None:
        """The next reply as a batch of one (``None`` at the end): what the blocking face pumps."""
        try:
            return [await self.__anext__()]
        except StopAsyncIteration:
            return None

    async def _run(self) -> None:
        error: PushChannelError
        try:
            error = await serve_forever(self._machine, self._policy, self._serve_one)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: end visibly rather than spin
            error = InternalError(f"the seed stream failed: {e!r}")
        self._machine.closed(error)
        await self._inbox.put(error)

    async def _serve_one(self) -> StreamEnd:
        generation, channel = self._connection.channel()
        method = channel.unary_stream(
            _METHOD,
            request_serializer=push_pb2.ConnRequest.SerializeToString,
            response_deserializer=push_pb2.MessageReply.FromString,
        )
        call: SeedCall = method(push_pb2.ConnRequest(channel=self.channel), metadata=self._metadata)
        try:
            timeout = self._policy.attempt_timeout
            try:
                async with asyncio.timeout(timeout):
                    connected = await _connected(channel, call)
            except TimeoutError:
                self._connection.replace(generation)
                return StreamEnd(Unavailable(f"no connection within {timeout:g} s"), True, True)
            if connected:
                # The seed's stream sends nothing until the first message: a connection up
                # with the call on it is as ready as it gets.
                self._machine.ready()
            return await self._read(call)
        finally:
            call.cancel()

    async def _read(self, call: SeedCall) -> StreamEnd:
        try:
            while True:
                reply = await call.read()
                if not isinstance(reply, push_pb2.MessageReply):  # grpc.aio.EOF
                    return StreamEnd(Unavailable("the broker ended the stream"), True)
                await self._inbox.put(reply)
        except grpc.aio.AioRpcError as e:
            return ended_by(e)
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise
            return StreamEnd(Cancelled(CANCELLED_UNDER_US), True)

    async def aclose(self) -> None:
        """End the stream. Idempotent."""
        self._done = True
        runner, self._runner = self._runner, None  # no cycle through its CancelledError
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait([runner])
        self._machine.closed()
        await self._connection.close()
        # Wake a reader waiting in __anext__.
        while not self._inbox.empty():
            self._inbox.get_nowait()
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(None)

    async def __aenter__(self) -> SeedStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _connected(channel: grpc.aio.Channel, call: SeedCall) -> bool:
    """Wait until the channel is READY while ``call`` runs (True), or the call ended (False)."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_done(_: object) -> None:
        if not ended.done():
            ended.set_result(None)

    call.add_done_callback(on_done)
    while True:
        state = channel.get_state(try_to_connect=True)
        if call.done():
            return False
        if state is grpc.ChannelConnectivity.READY:
            return True
        change = asyncio.ensure_future(channel.wait_for_state_change(state))
        try:
            await asyncio.wait([change, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await change


def seed_stream(
    target: str,
    channel: str,
    *,
    token: str | None = None,
    tls: grpc.ChannelCredentials | bool | None = None,
    retry: RetryPolicy | None = None,
    on_state_change: StateListener | None = None,
) -> SeedStream:
    """The seed's ``PushMessageStream(ConnRequest(channel))`` as an async iterator of
    ``MessageReply`` that reconnects by itself::

        async with seed_stream("localhost:50051", "hosts.berlin-1") as replies:
            async for reply in replies:
                handle(reply.message)
    """
    return SeedStream(target, channel, token=token, tls=tls, retry=retry, on_state_change=on_state_change)
