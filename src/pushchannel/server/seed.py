"""The seed's ``MessageSync`` service, byte for byte: unary submit, and a queue-mode stream on
the channel's default group that acks each message once its write completed."""

from __future__ import annotations

from grpc import aio

from pushchannel._proto import push_pb2, push_pb2_grpc
from pushchannel.core.broker import Broker
from pushchannel.core.model import DEFAULT_GROUP, NewMessage
from pushchannel.core.subscription import SubscribeParams
from pushchannel.server.auth import PUBLISH, SUBSCRIBE, Authorizer
from pushchannel.server.status import abort

Ctx = aio.ServicerContext[object, object]


class MessageSyncServicer(push_pb2_grpc.MessageSyncServicer):
    def __init__(self, broker: Broker, auth: Authorizer | None = None) -> None:
        self.broker = broker
        self.auth = auth or Authorizer()  # no auth file: everything allowed
        self._received = push_pb2.SubmitReply(reply="received")

    async def SubmitMessage(self, request: push_pb2.SubmitRequest, context: Ctx) -> push_pb2.SubmitReply:
        try:
            self.auth.authorize(context, PUBLISH, request.channel)
            await self.broker.publish(request.channel, [NewMessage(request.message.encode())])
        except Exception as exc:
            await abort(context, exc)
        return self._received

    async def PushMessageStream(self, request: push_pb2.ConnRequest, context: Ctx) -> None:
        broker, cfg = self.broker, self.broker.config
        params = SubscribeParams(
            channel=request.channel,
            group=DEFAULT_GROUP,
            max_in_flight=cfg.seed_max_in_flight,
            ack_deadline=cfg.default_ack_deadline,
            auto_ack=True,
        )
        try:
            principal = self.auth.authorize(context, SUBSCRIBE, request.channel)
            sub = await broker.subscribe(params, peer=context.peer())
        except Exception as exc:
            await abort(context, exc)
        watch = self.auth.watch(principal, SUBSCRIBE, sub.channel, sub.close)  # closed at token expiry
        Reply = push_pb2.MessageReply
        try:
            while True:
                batch = await sub.next_batch(cfg.heartbeat_interval)
                if batch is None:
                    continue  # the seed's proto has no heartbeat: gRPC keepalive watches the link
                if not batch:
                    return
                written = 0
                try:
                    for m in batch:
                        await context.write(Reply(message=m.payload.decode("utf-8", "replace")))
                        written += 1
                finally:
                    await broker.written(sub, batch[:written])
        except Exception as exc:
            await abort(context, exc)
        finally:
            watch.cancel()
            await broker.close_subscription(sub)
