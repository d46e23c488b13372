"""Where the SDK meets gRPC: the channel, its options, the typed method handles, and the one
place gRPC errors are turned into the pushchannel error tree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.errors import PushChannelError, error_for_code

_MiB = 1 << 20

# Long-lived streams through NAT and proxies: ping every 20 s, give up 10 s later (SPEC §3).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 16 * _MiB),
    ("grpc.max_receive_message_length", 16 * _MiB),
)

_SERVICE = "/pushchannel.v1.Broker/"

PublishCallable = grpc.aio.UnaryUnaryMultiCallable[pb.PublishRequest, pb.PublishResponse]
SubscribeCallable = grpc.aio.StreamStreamMultiCallable[pb.SubscribeRequest, pb.SubscribeResponse]
SubscribeCall = grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]
Metadata = tuple[tuple[str, str], ...]


def open_channel(target: str, tls: grpc.ChannelCredentials | bool | None) -> grpc.aio.Channel:
    """A grpc.aio channel; must be called with the event loop running."""
    if tls is None or tls is False:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials() if tls is True else tls
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


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


def translate(error: grpc.aio.AioRpcError) -> PushChannelError:
    """The pushchannel exception for a failed call, keeping the broker's message."""
    code: grpc.StatusCode = error.code()
    return error_for_code(code.name, error.details() or "")


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise gRPC call errors as pushchannel errors (the SDK's one boundary)."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        raise translate(e) from e
