"""Where the SDK meets gRPC: the channel, its options, the typed method handles, which failures
are worth retrying, and the one place gRPC errors are turned into the pushchannel error tree."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._types import RetryPolicy
from pushchannel.errors import PushChannelError, error_for_code

_MiB = 1 << 20

# Long-lived streams through NAT and proxies: ping every 20 s, give up 10 s later (SPEC §3).
# The broker accepts pings down to 5 s apart (server/app.py), so these never earn a GOAWAY
# too_many_pings; permit_without_calls keeps an idle producer's NAT mapping alive too.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *KEEPALIVE_OPTIONS,
    ("grpc.max_send_message_length", 16 * _MiB),
    ("grpc.max_receive_message_length", 16 * _MiB),
    # Each client its own connection: gRPC otherwise pools one connection per target across a
    # process, and the broker caps the streams per connection (max_concurrent_streams).
    ("grpc.use_local_subchannel_pool", 1),
)

# Failures that say "this request cannot succeed as it is": raised at once, never retried.
_FINAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def retryable(code: grpc.StatusCode, *, publish: bool) -> bool:
    """Whether a call that failed with ``code`` may succeed when tried again.

    Everything but bad input and missing rights is: UNAVAILABLE, a deadline, a stream CANCELLED
    by an overloaded broker before it opened, and the INTERNAL/UNKNOWN that gRPC reports for a
    connection reset mid-call. A publish is safe to retry because its messages carry ids; it is
    not retried on RESOURCE_EXHAUSTED (a full channel, a frame too large), which needs a person.
    """
    if code in _FINAL:
        return False
    return not (publish and code is grpc.StatusCode.RESOURCE_EXHAUSTED)


def cancelled_under_us() -> bool:
    """Called on a CancelledError: True when it came from the gRPC call being cancelled (its
    channel was closed, e.g. replaced as dead), which grpc.aio raises as CancelledError, rather
    than from the running task being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def channel_options(policy: RetryPolicy) -> tuple[tuple[str, int], ...]:
    """The channel's options: keepalive, frame limits, and gRPC's own reconnect backoff kept
    within ours (its default grows to 120 s, which would outlast our ``max_backoff``)."""
    return (
        *CHANNEL_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", max(1, round(policy.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(policy.max_backoff * 1000))),
    )


_SERVICE = "/pushchannel.v1.Broker/"

PublishCallable = grpc.aio.UnaryUnaryMultiCallable[pb.PublishRequest, pb.PublishResponse]
SubscribeCallable = grpc.aio.StreamStreamMultiCallable[pb.SubscribeRequest, pb.SubscribeResponse]
SubscribeCall = grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]
Metadata = tuple[tuple[str, str], ...]


def open_channel(
    target: str, tls: grpc.ChannelCredentials | bool | None, policy: RetryPolicy | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel; must be called with the event loop running."""
    options = channel_options(policy or RetryPolicy())
    if tls is None or tls is False:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials() if tls is True else tls
    return grpc.aio.secure_channel(target, credentials, options=options)


class Connection:
    """The client's gRPC channel, which a stream may declare dead.

    gRPC keeps using a TCP connection until keepalive gives up on it (30 s). A subscription
    that hears nothing for three heartbeat intervals knows sooner: it calls :meth:`replace`
    with the generation it used, and the next call gets a fresh channel (a new connection)
    while the old one is closed in the background, cancelling whatever still runs on it.
    Several streams noticing the same dead connection replace it once.
    """

    def __init__(self, target: str, tls: grpc.ChannelCredentials | bool | None, policy: RetryPolicy) -> None:
        self.target = target
        self._tls = tls
        self._policy = policy
        self._generation = 0
        self._channel: grpc.aio.Channel | None = None
        self._methods: BrokerMethods | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False

    def channel(self) -> tuple[int, grpc.aio.Channel]:
        """The current channel and its generation; made on first use (in the running loop)."""
        if self.closed:
            raise RuntimeError("this pushchannel client is closed")
        if self._channel is None:
            self._channel = open_channel(self.target, self._tls, self._policy)
        return self._generation, self._channel

    def broker(self) -> tuple[int, BrokerMethods]:
        """The Broker service's methods on the current channel, and its generation."""
        generation, channel = self.channel()
        if self._methods is None:
            self._methods = BrokerMethods(channel)
        return generation, self._methods

    def replace(self, generation: int) -> None:
        """The channel of ``generation`` is dead: the next call gets a new one."""
        if generation != self._generation or self._channel is None or self.closed:
            return
        old, self._channel, self._methods = self._channel, None, None
        self._generation += 1
        task = asyncio.get_running_loop().create_task(old.close(grace=None), name="pushchannel-channel-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the channel (cancelling its calls). Idempotent."""
        self.closed = True
        channel, self._channel, self._methods = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task


class ConnectionPool:
    """A client's connections. Publishes go over the first; each subscription leases a place on
    the first connection with fewer than ``per_connection`` streams, and a new connection is
    made when every one is full.

    A broker takes at most ``max_concurrent_streams`` (1000) calls at once on one connection and
    holds back the rest without a word, so one connection cannot carry a gateway's thousands of
    hosts. Streams sharing a connection also cost the broker about half the memory of streams on
    a connection each (docs/operations.md). A connection other than the first is closed once its
    last subscription lets go of it.
    """

    def __init__(
        self,
        target: str,
        tls: grpc.ChannelCredentials | bool | None,
        policy: RetryPolicy,
        per_connection: int = 100,
    ) -> None:
        if per_connection < 1:
            raise ValueError("streams_per_connection must be at least 1")
        self._args = (target, tls, policy)
        self.per_connection = per_connection
        self.first = Connection(*self._args)
        self._streams: dict[Connection, int] = {self.first: 0}  # in the order they were made
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """How many connections the pool holds now."""
        return len(self._streams)

    def lease(self) -> Connection:
        """A place for one stream on a connection with room; made if none has."""
        if self.first.closed:
            raise RuntimeError("this pushchannel client is closed")
        for connection, streams in self._streams.items():
            if streams < self.per_connection:
                self._streams[connection] = streams + 1
                return connection
        connection = Connection(*self._args)
        self._streams[connection] = 1
        return connection

    def release(self, connection: Connection) -> None:
        """A stream's place is free; an emptied connection other than the first is closed."""
        streams = self._streams.get(connection)
        if streams is None:
            return
        if streams > 1 or connection is self.first:
            self._streams[connection] = max(0, streams - 1)
            return
        del self._streams[connection]
        task = asyncio.get_running_loop().create_task(connection.close(), name="pushchannel-channel-close")
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        """Close every connection (cancelling their calls). Idempotent."""
        connections, self._streams = list(self._streams), {}
        for connection in connections:
            await connection.close()
        for task in list(self._retired):
            with contextlib.suppress(Exception):
                await task


def call_metadata(token: str | None) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


class BrokerMethods:
    """Typed handles on the Broker service's methods (the generated stub is untyped)."""

    __slots__ = ("publish", "subscribe")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.publish: PublishCallable = channel.unary_unary(
            _SERVICE + "Publish",
            request_serializer=pb.PublishRequest.SerializeToString,
            response_deserializer=pb.PublishResponse.FromString,
        )
        self.subscribe: SubscribeCallable = channel.stream_stream(
            _SERVICE + "Subscribe",
            request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=pb.SubscribeResponse.FromString,
        )


# gRPC's own refusal, before anything is sent, of a request over the channel's send limit.
_TOO_LARGE = re.compile(r"CLIENT: Sent message larger than max \((\d+) vs\. (\d+)\)")


def translate(error: grpc.aio.AioRpcError) -> PushChannelError:
    """The pushchannel exception for a failed call, keeping the broker's message."""
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and (m := _TOO_LARGE.search(details)):
        details = (
            f"the request is {int(m[1]):,} bytes, over the {int(m[2]):,} a gRPC message may carry; "
            "nothing was sent (a payload is limited to the broker's max_payload, 1 MiB by default)"
        )
    return error_for_code(code.name, details)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise gRPC call errors as pushchannel errors (the SDK's one boundary)."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        raise translate(e) from e
