"""The asyncio client: :class:`AsyncClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._publisher import Publisher
from pushchannel.client._state import StateListener
from pushchannel.client._subscriber import Subscriber
from pushchannel.client._subscription import Subscription
from pushchannel.client._types import OutgoingMessage, PublishResult, RetryPolicy, as_payload, new_message_id
from pushchannel.client._wire import ConnectionPool, call_metadata

MAX_BATCH = 1000  # messages per Publish call (SPEC §8)
# Bytes per Publish call: below gRPC's default 4 MiB receive limit, whatever the broker's is.
_MAX_BATCH_BYTES = 3 << 20

Start = Literal["new", "earliest"] | int | datetime | None
Payload = bytes | str


class AsyncClient:
    """A connection to a pushchannel broker, for asyncio.

    ``target`` is ``host:port``. ``token`` is sent as ``authorization: Bearer <token>`` on
    every call. ``tls`` is ``None`` (plaintext), ``True`` (TLS with the system's roots) or a
    :func:`grpc.ssl_channel_credentials` object. ``retry`` says how publishes are retried and
    subscriptions reopened after transient faults (default: :class:`RetryPolicy`, forever).
    ``on_state_change`` is called with every :class:`StateChange` of every subscription of
    this client (on the event loop; keep it short). ``streams_per_connection`` caps the
    subscriptions that share one connection: past it the client opens another (keep it at or
    under the broker's ``max_concurrent_streams``, 1000 by default).

    Use it as ``async with AsyncClient(...) as client:`` or call :meth:`close`. The gRPC
    channel is made on first use, inside the running event loop.
    """

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
        self.target = target
        self.retry = retry or RetryPolicy()
        self._metadata = call_metadata(token)
        self._connections = ConnectionPool(target, tls, self.retry, streams_per_connection)
        self._publisher = Publisher(self._connections.first, self._metadata, self.retry)
        self._listeners: tuple[StateListener, ...] = (on_state_change,) if on_state_change else ()
        self._subscribers: set[Subscriber] = set()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        self._connections.first.channel()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End every subscription of this client and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        subscribers, self._subscribers = self._subscribers, set()
        await asyncio.gather(*(s.close() for s in subscribers))
        await self._connections.close()

    async def publish(
        self,
        channel: str,
        payload: bytes | str,
        *,
        attributes: Mapping[str, str] | None = None,
        id: str | None = None,
        ttl: float | None = None,
    ) -> PublishResult:
        """Store one message on ``channel`` and return where it went.

        ``payload`` ``str`` is sent as UTF-8. Without ``id`` the client makes one up (128 random bits),
        so a retry of this very call can never store the message twice. ``ttl`` (seconds): a
        message not delivered within it is dropped.

        A publish that goes unanswered (connection lost, broker restarting) is retried with
        the same id as the client's :class:`RetryPolicy` says; one that cannot succeed (bad
        input, permission, a full channel) raises at once.
        """
        request = pb.PublishRequest(channel=channel)
        request.messages.add(**_fields(OutgoingMessage(payload, id=id, attributes=attributes or {}, ttl=ttl)))
        (result,) = await self._publish(request)
        return result

    async def publish_many(
        self, channel: str, messages: Iterable[bytes | str | OutgoingMessage]
    ) -> list[PublishResult]:
        """Store many messages on ``channel``, in order; one result per message.

        ``messages`` are payloads or :class:`OutgoingMessage`. They go in Publish calls of at
        most 1000 messages (and about 3 MiB); each call is atomic and retried like
        :meth:`publish`; calls are made one after the other, so an error leaves the earlier
        batches stored and the later ones not.
        """
        results: list[PublishResult] = []
        for request in _requests(channel, messages):
            results.extend(await self._publish(request))
        return results

    async def _publish(self, request: pb.PublishRequest) -> list[PublishResult]:
        if self._closed:
            raise RuntimeError("this pushchannel client is closed")
        return await self._publisher.publish(request)

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
    ) -> Subscription:
        """Subscribe to ``channel``: an async iterator of :class:`Message`.

        ``group``: consumers of one group share its messages, each message going to one of
        them. ``broadcast``: this subscriber gets every message, in an anonymous group of its
        own that lives as long as the stream (``group`` is then ignored). ``start`` is where a
        group that does not exist yet begins: ``"new"``, ``"earliest"``, a ``seq`` or a
        :class:`~datetime.datetime` (naive: local time); ``None`` is the group's own default
        (the ``default`` group keeps everything published before any consumer came, other
        groups and broadcast start at new messages). At most ``max_in_flight`` deliveries are unacked
        at once; one not acked within ``ack_deadline`` seconds is delivered again.
        ``auto_ack``: every delivery counts as acked once sent (at-most-once).
        ``max_lease``: while the application holds a delivery unsettled, the client extends
        its deadline (``ModifyDeadline``) so a long task is not delivered to someone else;
        after ``max_lease`` seconds it stops, and the broker delivers the message again.

        The stream opens when iteration starts (or on ``await subscription.open()``), and is
        reopened in the same group after transient faults, with the client's retry policy.
        """
        open_request = _open_request(channel, group, broadcast, start, max_in_flight, ack_deadline, auto_ack)
        if not max_lease > 0:
            raise ValueError("max_lease must be positive")
        return Subscription(self._subscriber(open_request, max_lease))

    def _subscriber(self, open_request: pb.Open, max_lease: float = 3600.0) -> Subscriber:
        """A Subscriber tied to this client (closed with it); shared with the blocking Client."""
        if self._closed:
            raise RuntimeError("this pushchannel client is closed")
        # Forgotten once closed, so a long-lived client that subscribes many times does not
        # keep every old stream alive.
        subscriber = Subscriber(
            self._connections,
            open_request,
            metadata=self._metadata,
            policy=self.retry,
            max_lease=max_lease,
            listeners=self._listeners,
            on_close=self._subscribers.discard,
        )
        self._subscribers.add(subscriber)
        return subscriber


def _open_request(
    channel: str,
    group: str,
    broadcast: bool,
    start: Start,
    max_in_flight: int,
    ack_deadline: float,
    auto_ack: bool,
) -> pb.Open:
    if not 1 <= max_in_flight <= 10_000:
        raise ValueError("max_in_flight must be within 1..10000")
    if not 0 < ack_deadline <= 3600 * 12:
        raise ValueError("ack_deadline must be within (0, 43200] seconds")
    request = pb.Open(
        channel=channel,
        group="" if broadcast else group,
        mode=pb.Open.BROADCAST if broadcast else pb.Open.QUEUE,
        max_in_flight=max_in_flight,
        ack_deadline_ms=max(1, round(ack_deadline * 1000)),
        auto_ack=auto_ack,
    )
    if start is None:
        pass  # leave the oneof unset: the broker applies the group's default
    elif start == "new":
        request.position = pb.Open.NEW
    elif start == "earliest":
        request.position = pb.Open.EARLIEST
    elif isinstance(start, datetime):
        request.start_time_ms = int(start.timestamp() * 1000)
    elif isinstance(start, int) and not isinstance(start, bool) and start >= 1:
        request.start_seq = start
    else:
        raise ValueError(f"start must be 'new', 'earliest', a seq >= 1 or a datetime, not {start!r}")
    return request


def _fields(message: bytes | str | OutgoingMessage) -> dict[str, Any]:
    """A message's protobuf fields. The caller adds them to its request in place
    (``request.messages.add(**fields)``): a message built on its own would be copied into the
    request, which costs more than building it."""
    if not isinstance(message, OutgoingMessage):
        return {"id": new_message_id(), "payload": as_payload(message)}
    ttl_ms = 0
    if message.ttl is not None:
        if message.ttl <= 0:
            raise ValueError("ttl must be positive")
        ttl_ms = max(1, round(message.ttl * 1000))
    return {
        "id": message.id or new_message_id(),
        "payload": as_payload(message.payload),
        "attributes": message.attributes,
        "ttl_ms": ttl_ms,
    }


def _requests(channel: str, messages: Iterable[bytes | str | OutgoingMessage]) -> Iterator[pb.PublishRequest]:
    """Publish requests of at most MAX_BATCH messages and about _MAX_BATCH_BYTES each, in order.
    A message that does not encode raises when it is reached: the requests before it were
    already yielded."""
    request = pb.PublishRequest(channel=channel)
    size = 0
    for message in messages:
        fields = _fields(message)
        n = request.messages.add(**fields).ByteSize()
        count = len(request.messages)
        if count > 1 and (count > MAX_BATCH or size + n > _MAX_BATCH_BYTES):
            del request.messages[-1]  # it starts the next request
            yield request
            request = pb.PublishRequest(channel=channel)
            request.messages.add(**fields)
            size = 0
        size += n
    if request.messages:
        yield request
