"""The blocking faces: :class:`Client` over :class:`AsyncClient`, and :func:`blocking_seed_stream`
over :class:`SeedStream`.

Each runs its async twin on a private event loop in one daemon thread and calls into it with
:func:`asyncio.run_coroutine_threadsafe`; nothing of the protocol, the retries or the reconnect
state machine is written twice. Subscriptions cross the thread boundary a delivery batch at a
time, not a message at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import grpc

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._async import AsyncClient, Start, _open_request
from pushchannel.client._blocking import BlockingSeedStream, BlockingSubscription, LoopThread
from pushchannel.client._seed import SeedStream
from pushchannel.client._state import StateListener
from pushchannel.client._subscriber import Subscriber
from pushchannel.client._types import OutgoingMessage, PublishResult, RetryPolicy

_CLOSED = "this pushchannel client is closed"


class Client:
    """A blocking connection to a pushchannel broker: the methods of :class:`AsyncClient`
    without ``await``. Thread-safe. Use it as ``with Client(...) as client:`` or call
    :meth:`close`, which also ends the subscriptions other threads are iterating.
    ``on_state_change`` runs on the client's event-loop thread: keep it short and thread-safe."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        tls: grpc.ChannelCredentials | bool | None = None,
        retry: RetryPolicy | None = None,
        on_state_change: StateListener | None = None,
        streams_per_connection: int = 100,
    ) -> None:
        self._aio = AsyncClient(
            target,
            token=token,
            tls=tls,
            retry=retry,
            on_state_change=on_state_change,
            streams_per_connection=streams_per_connection,
        )
        self._thread = LoopThread("pushchannel-client", _CLOSED)

    @property
    def target(self) -> str:
        return self._aio.target

    @property
    def retry(self) -> RetryPolicy:
        return self._aio.retry

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
        return self._thread.run(self._aio.publish(channel, payload, attributes=attributes, id=id, ttl=ttl))

    def publish_many(
        self, channel: str, messages: Iterable[bytes | str | OutgoingMessage]
    ) -> list[PublishResult]:
        """See :meth:`AsyncClient.publish_many`. ``messages`` is read in this thread."""
        return self._thread.run(self._aio.publish_many(channel, list(messages)))

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
        max_lease: float = 3600.0,
    ) -> BlockingSubscription:
        """See :meth:`AsyncClient.subscribe`; returns a plain iterator of :class:`Message`
        whose ``ack()`` and ``nack()`` are ordinary calls."""
        request = _open_request(channel, group, broadcast, start, max_in_flight, ack_deadline, auto_ack)
        if not max_lease > 0:
            raise ValueError("max_lease must be positive")
        subscriber = self._thread.run(_make_subscriber(self._aio, request, max_lease))
        return BlockingSubscription(subscriber, self._thread.loop)

    def close(self) -> None:
        """Close every subscription and the connection, then stop the loop thread.
        Idempotent; safe from any thread but the client's own."""
        self._thread.stop(self._aio.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _make_subscriber(client: AsyncClient, request: pb.Open, max_lease: float) -> Subscriber:
    return client._subscriber(request, max_lease)


def blocking_seed_stream(
    target: str,
    channel: str,
    *,
    token: str | None = None,
    tls: grpc.ChannelCredentials | bool | None = None,
    retry: RetryPolicy | None = None,
    on_state_change: StateListener | None = None,
) -> BlockingSeedStream:
    """The blocking twin of :func:`seed_stream`: the seed's ``PushMessageStream`` as a plain
    iterator of ``MessageReply`` that reconnects by itself::

        with blocking_seed_stream("localhost:50051", "hosts.berlin-1") as replies:
            for reply in replies:
                handle(reply.message)

    It runs on an event loop thread of its own until :meth:`BlockingSeedStream.close`.
    ``on_state_change`` runs on that thread.
    """
    stream = SeedStream(target, channel, token=token, tls=tls, retry=retry, on_state_change=on_state_change)
    return BlockingSeedStream(stream, LoopThread("pushchannel-seed-stream", "this seed stream is closed"))
