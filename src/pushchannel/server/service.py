"""``pushchannel.v1.Broker``: parse, call the core, map errors, write batches. Nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from pushchannel.core.broker import Broker
from pushchannel.core.model import Stored
from pushchannel.core.subscription import Subscription
from pushchannel.core.timeslice import TimeSlice
from pushchannel.errors import FailedPrecondition, PushChannelError, Unauthenticated
from pushchannel.server import convert
from pushchannel.server.auth import ADMIN, PUBLISH, SUBSCRIBE, Authorizer
from pushchannel.server.status import abort, status_code

log = logging.getLogger("pushchannel.server")
Ctx = aio.ServicerContext[object, object]
PUBLISH_WINDOW = 32  # PublishStream requests in progress at once, per stream


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    def __init__(self, broker: Broker, auth: Authorizer | None = None) -> None:
        self.broker = broker
        self.auth = auth or Authorizer()  # no auth file: everything allowed
        self._shared: tuple[list[Stored], str, pb.SubscribeResponse] | None = None

    async def Publish(self, request: pb.PublishRequest, context: Ctx) -> pb.PublishResponse:
        try:
            self.auth.authorize(context, PUBLISH, request.channel)
            results = await self.broker.publish(request.channel, convert.new_messages(request))
        except Exception as exc:
            await abort(context, exc)
        return convert.publish_response(results)

    async def PublishStream(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Ctx
    ) -> AsyncIterator[pb.PublishResponse]:
        """Requests are published concurrently (up to PUBLISH_WINDOW at once, so a store with
        group commit shares transactions between them) and answered in request order."""
        auth = self.auth
        window: asyncio.Queue[asyncio.Task[pb.PublishResponse] | BaseException | None] = asyncio.Queue(
            PUBLISH_WINDOW
        )
        reader: asyncio.Task[None] | None = None
        try:
            principal = auth.authorize(context)  # rights are checked per request

            async def read() -> None:
                loop = asyncio.get_running_loop()
                try:
                    async for request in auth.until_expiry(principal, request_iterator):
                        await window.put(loop.create_task(self._publish_one(principal, request, context)))
                    await window.put(None)
                except Exception as exc:  # the token expired, or a malformed frame
                    await window.put(exc)

            reader = asyncio.get_running_loop().create_task(read())
            while (item := await window.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield await item
        except PushChannelError as exc:  # no token, it expired meanwhile, or a malformed frame
            await abort(context, exc)
        finally:
            if reader is not None:
                reader.cancel()
            while not window.empty():  # answers nobody will read: let them finish, quietly
                item = window.get_nowait()
                if isinstance(item, asyncio.Task):
                    item.add_done_callback(_consume)

    async def _publish_one(
        self, principal: Any, request: pb.PublishRequest, context: Ctx
    ) -> pb.PublishResponse:
        try:
            self.auth.check(principal, PUBLISH, request.channel, context)
            results = await self.broker.publish(request.channel, convert.new_messages(request))
        except Unauthenticated:
            raise  # the token expired or a reload revoked it: the stream ends
        except PushChannelError as exc:
            return pb.PublishResponse(
                ref=request.ref, error_code=status_code(exc).value[0], error_message=str(exc)
            )
        return convert.publish_response(results, request.ref)

    async def Subscribe(self, request_iterator: AsyncIterator[pb.SubscribeRequest], context: Ctx) -> None:
        broker, cfg = self.broker, self.broker.config
        try:
            # context.read(), not the request iterator: that is an async generator around read(),
            # alive (and tracked by the loop) as long as the stream: 0.4 KB per idle host.
            first = await context.read()
            if not isinstance(first, pb.SubscribeRequest) or first.WhichOneof("kind") != "open":
                raise FailedPrecondition("a Subscribe stream must begin with Open")
            principal = self.auth.authorize(context, SUBSCRIBE, first.open.channel)
            sub = await broker.subscribe(convert.subscribe_params(first.open, cfg), peer=context.peer())
        except Exception as exc:
            await abort(context, exc)
        watch = self.auth.watch(principal, SUBSCRIBE, sub.channel, sub.close)  # closed at token expiry
        reader = asyncio.get_running_loop().create_task(self._read(context, sub))
        try:
            await context.write(convert.opened(sub, cfg))
            heartbeat = cfg.heartbeat_interval
            while True:
                batch = await sub.next_batch(heartbeat)
                if batch is None:
                    await context.write(
                        pb.SubscribeResponse(heartbeat=pb.Heartbeat(server_time_us=int(time.time() * 1e6)))
                    )
                    continue
                if not batch:
                    return
                for frame in convert.frames(batch):
                    await context.write(self._encode(sub, frame))
                    await broker.written(sub, frame)
        except PushChannelError as exc:
            await abort(context, exc)
        finally:
            watch.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await broker.close_subscription(sub)

    def _encode(self, sub: Subscription, frame: list[Stored]) -> pb.SubscribeResponse:
        """A broadcast hands one list of messages to every subscriber that kept up: encode it
        once (its deliveries are the same for all of them)."""
        shared = self._shared
        if shared is not None and shared[0] is frame and shared[1] == sub.channel:
            return shared[2]
        msg = convert.deliveries(sub.channel, frame)
        if sub.broadcast:
            self._shared = (frame, sub.channel, msg)
        return msg

    async def _read(self, context: Ctx, sub: Subscription) -> None:
        """Acks, nacks and deadline changes, each one batch to the core."""
        broker = self.broker
        try:
            while isinstance(req := await context.read(), pb.SubscribeRequest):  # else EOF
                kind = req.WhichOneof("kind")
                if kind == "ack":
                    await broker.ack(sub, list(req.ack.delivery_tags))
                elif kind == "nack":
                    n = req.nack
                    await broker.nack(sub, list(n.delivery_tags), n.delay_ms / 1000.0, n.reason)
                elif kind == "modify_deadline":
                    m = req.modify_deadline
                    await broker.modify_deadline(sub, list(m.delivery_tags), m.deadline_ms / 1000.0)
                elif kind == "open":
                    sub.close(FailedPrecondition("Open was sent twice on one Subscribe stream"))
                    return
            # The client half-closed: its last acks are in, so the subscription ends cleanly
            # (as a StreamingPull does); a client keeps its request stream open to keep receiving.
            sub.close()
        except PushChannelError as exc:
            sub.close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke under us: the writer side will notice
            log.debug("subscribe reader of %s ended: %s", sub.id, exc)

    # -- admin -----------------------------------------------------------------------------------
    async def ListChannels(self, request: pb.ListChannelsRequest, context: Ctx) -> pb.ListChannelsResponse:
        try:
            self.auth.authorize(context, ADMIN)
            now = time.time()
            infos = []
            pause = TimeSlice()  # thousands of channels: let the streams run in between
            for name in await self.broker.list_channels(request.prefix):
                with contextlib.suppress(PushChannelError):  # deleted meanwhile
                    infos.append(await convert.channel_info_of(self.broker, name, now))
                await pause.tick()
            return pb.ListChannelsResponse(channels=infos)
        except Exception as exc:
            await abort(context, exc)

    async def GetChannel(self, request: pb.GetChannelRequest, context: Ctx) -> pb.ChannelInfo:
        try:
            self.auth.authorize(context, ADMIN)
            return await convert.channel_info_of(self.broker, request.channel, time.time())
        except Exception as exc:
            await abort(context, exc)

    async def PurgeChannel(self, request: pb.PurgeChannelRequest, context: Ctx) -> pb.PurgeChannelResponse:
        try:
            self.auth.authorize(context, ADMIN)
            return pb.PurgeChannelResponse(purged=await self.broker.purge(request.channel))
        except Exception as exc:
            await abort(context, exc)

    async def DeleteChannel(self, request: pb.DeleteChannelRequest, context: Ctx) -> pb.DeleteChannelResponse:
        try:
            self.auth.authorize(context, ADMIN)
            return pb.DeleteChannelResponse(deleted=await self.broker.delete_channel(request.channel))
        except Exception as exc:
            await abort(context, exc)

    async def DeleteGroup(self, request: pb.DeleteGroupRequest, context: Ctx) -> pb.DeleteGroupResponse:
        try:
            self.auth.authorize(context, ADMIN)
            return pb.DeleteGroupResponse(
                deleted=await self.broker.delete_group(request.channel, request.group)
            )
        except Exception as exc:
            await abort(context, exc)
