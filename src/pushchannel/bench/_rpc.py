"""Typed gRPC handles for the load side: raw method calls, no SDK, so that the figures measure
the server and not the client library."""

from __future__ import annotations

import grpc
import grpc.aio

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

_MiB = 1 << 20

# One TCP connection per grpc channel, as hosts have: without a local subchannel pool,
# channels with the same arguments share one connection.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", 16 * _MiB),
    ("grpc.max_receive_message_length", 16 * _MiB),
)

# Metadata the raw-gRPC ceiling server reads to know the shape it must stream; the broker and
# the minimal broker ignore it.
MD_MESSAGES = "x-bench-messages"  # messages this stream receives (0: one frame per publish)
MD_BATCH = "x-bench-batch"
MD_PAYLOAD = "x-bench-payload"

SubscribeCall = grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]
PublishStreamCall = grpc.aio.StreamStreamCall[pb.PublishRequest, pb.PublishResponse]
SeedStreamCall = grpc.aio.UnaryStreamCall[push_pb2.ConnRequest, push_pb2.MessageReply]
Metadata = tuple[tuple[str, str], ...]


def shape_metadata(messages: int, batch: int, payload: int) -> Metadata:
    return ((MD_MESSAGES, str(messages)), (MD_BATCH, str(batch)), (MD_PAYLOAD, str(payload)))


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


class Stubs:
    """The methods of both services on one channel (the generated stubs are untyped)."""

    __slots__ = ("channel", "publish", "publish_stream", "push_stream", "submit", "subscribe")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.publish: grpc.aio.UnaryUnaryMultiCallable[pb.PublishRequest, pb.PublishResponse] = (
            channel.unary_unary(
                "/pushchannel.v1.Broker/Publish",
                request_serializer=pb.PublishRequest.SerializeToString,
                response_deserializer=pb.PublishResponse.FromString,
            )
        )
        self.publish_stream: grpc.aio.StreamStreamMultiCallable[pb.PublishRequest, pb.PublishResponse] = (
            channel.stream_stream(
                "/pushchannel.v1.Broker/PublishStream",
                request_serializer=pb.PublishRequest.SerializeToString,
                response_deserializer=pb.PublishResponse.FromString,
            )
        )
        self.subscribe: grpc.aio.StreamStreamMultiCallable[pb.SubscribeRequest, pb.SubscribeResponse] = (
            channel.stream_stream(
                "/pushchannel.v1.Broker/Subscribe",
                request_serializer=pb.SubscribeRequest.SerializeToString,
                response_deserializer=pb.SubscribeResponse.FromString,
            )
        )
        self.submit: grpc.aio.UnaryUnaryMultiCallable[push_pb2.SubmitRequest, push_pb2.SubmitReply] = (
            channel.unary_unary(
                "/MessageSync/SubmitMessage",
                request_serializer=push_pb2.SubmitRequest.SerializeToString,
                response_deserializer=push_pb2.SubmitReply.FromString,
            )
        )
        self.push_stream: grpc.aio.UnaryStreamMultiCallable[push_pb2.ConnRequest, push_pb2.MessageReply] = (
            channel.unary_stream(
                "/MessageSync/PushMessageStream",
                request_serializer=push_pb2.ConnRequest.SerializeToString,
                response_deserializer=push_pb2.MessageReply.FromString,
            )
        )

    @classmethod
    def connect(cls, target: str) -> Stubs:
        return cls(open_channel(target))

    async def close(self) -> None:
        await self.channel.close(None)
