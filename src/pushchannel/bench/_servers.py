"""The two baselines every run measures next to the broker, each in a process of its own:

- ``raw``: the raw gRPC ceiling. A bare ``grpc.aio`` server speaking the broker's own
  protocol with nothing behind it: it answers publishes with pre-built responses and streams
  pre-built frames (the broker's own ``DeliveryBatch`` and ``MessageReply`` types) of the shape
  the client asks for in its metadata. A stream with a quota (``x-bench-messages``) gets it as
  fast as gRPC can write, from the first publish on its channel; a stream without one gets one
  frame per publish on its channel (for push-to-all timings).
- ``minimal``: the minimal broker. Publish -> ``asyncio.Queue`` -> stream, for both services,
  with no store, no acks, no flow control: what a broker costs at the very least in Python.

Run as ``python -m pushchannel.bench._servers raw|minimal --listen 127.0.0.1:0``; prints
``listening on HOST:PORT`` to stderr once it serves, stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from grpc import aio

from pushchannel._gc import tune_collector
from pushchannel._proto import push_pb2, push_pb2_grpc
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from pushchannel.bench._rpc import MD_BATCH, MD_MESSAGES, MD_PAYLOAD

Ctx = aio.ServicerContext[object, object]

_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.so_reuseport", 0),
]


def _shape(context: Ctx) -> tuple[int, int, int]:
    md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    return int(md.get(MD_MESSAGES, "0")), int(md.get(MD_BATCH, "1")), int(md.get(MD_PAYLOAD, "100"))


def _opened(channel: str, group: str) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        opened=pb.Opened(
            channel=channel,
            group=group or "default",
            consumer="bench",
            max_in_flight=1000,
            ack_deadline_ms=30_000,
        )
    )


async def _drain(requests: AsyncIterator[object]) -> None:
    with contextlib.suppress(Exception):
        async for _ in requests:
            pass


# -- the raw gRPC ceiling --------------------------------------------------------------------------


class _Frames:
    """Pre-built frames and responses, made once per shape."""

    def __init__(self) -> None:
        self._deliveries: dict[tuple[str, int, int], pb.SubscribeResponse] = {}
        self._results: dict[int, pb.PublishResponse] = {}
        self._replies: dict[int, push_pb2.MessageReply] = {}

    def deliveries(self, channel: str, n: int, payload: int) -> pb.SubscribeResponse:
        key = (channel, n, payload)
        frame = self._deliveries.get(key)
        if frame is None:
            now_us = int(time.time() * 1e6)
            body = b"x" * payload
            frame = self._deliveries[key] = pb.SubscribeResponse(
                deliveries=pb.DeliveryBatch(
                    deliveries=[
                        pb.Delivery(
                            channel=channel,
                            seq=i,
                            payload=body,
                            publish_time_us=now_us,
                            attempt=1,
                            delivery_tag=i,
                        )
                        for i in range(1, n + 1)
                    ]
                )
            )
        return frame

    def results(self, n: int) -> pb.PublishResponse:
        response = self._results.get(n)
        if response is None:
            response = self._results[n] = pb.PublishResponse(
                results=[pb.PublishResult(seq=i) for i in range(1, n + 1)]
            )
        return response

    def reply(self, payload: int) -> push_pb2.MessageReply:
        reply = self._replies.get(payload)
        if reply is None:
            reply = self._replies[payload] = push_pb2.MessageReply(message="x" * payload)
        return reply


@dataclass
class _RawChannel:
    started: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: set[asyncio.Queue[int]] = field(default_factory=set)


class RawBroker(broker_pb2_grpc.BrokerServicer):
    def __init__(self, frames: _Frames, channels: dict[str, _RawChannel]) -> None:
        self.frames = frames
        self.channels = channels

    def _published(self, channel: str, n: int) -> None:
        ch = self.channels.setdefault(channel, _RawChannel())
        ch.started.set()
        for q in ch.listeners:
            q.put_nowait(n)

    async def Publish(self, request: pb.PublishRequest, context: Ctx) -> pb.PublishResponse:
        self._published(request.channel, len(request.messages))
        return self.frames.results(len(request.messages))

    async def PublishStream(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Ctx
    ) -> AsyncIterator[pb.PublishResponse]:
        async for request in request_iterator:
            n = len(request.messages)
            self._published(request.channel, n)
            response = self.frames.results(n)
            response.ref = request.ref  # serialised before the generator is resumed
            yield response

    async def Subscribe(self, request_iterator: AsyncIterator[pb.SubscribeRequest], context: Ctx) -> None:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        channel = first.open.channel
        quota, batch, payload = _shape(context)
        await context.write(_opened(channel, first.open.group))
        reader = asyncio.get_running_loop().create_task(_drain(request_iterator))
        ch = self.channels.setdefault(channel, _RawChannel())
        try:
            if quota > 0:
                await ch.started.wait()
                frame = self.frames.deliveries(channel, batch, payload)
                for _ in range(quota // batch):
                    await context.write(frame)
                if quota % batch:
                    await context.write(self.frames.deliveries(channel, quota % batch, payload))
                await reader  # until the client is done with the stream
                return
            queue: asyncio.Queue[int] = asyncio.Queue()
            ch.listeners.add(queue)
            try:
                while True:
                    n = await queue.get()
                    await context.write(self.frames.deliveries(channel, n, payload))
            finally:
                ch.listeners.discard(queue)
        finally:
            reader.cancel()


class RawSeed(push_pb2_grpc.MessageSyncServicer):
    def __init__(self, frames: _Frames, channels: dict[str, _RawChannel]) -> None:
        self.frames = frames
        self.channels = channels
        self._received = push_pb2.SubmitReply(reply="received")

    async def SubmitMessage(self, request: push_pb2.SubmitRequest, context: Ctx) -> push_pb2.SubmitReply:
        self.channels.setdefault(request.channel, _RawChannel()).started.set()
        return self._received

    async def PushMessageStream(self, request: push_pb2.ConnRequest, context: Ctx) -> None:
        quota, _, payload = _shape(context)
        ch = self.channels.setdefault(request.channel, _RawChannel())
        await ch.started.wait()
        reply = self.frames.reply(payload)
        for _ in range(quota):
            await context.write(reply)
        await asyncio.sleep(3600)  # the client cancels once it counted everything


# -- the minimal broker ----------------------------------------------------------------------------


@dataclass
class _MinChannel:
    seq: int = 0
    queue: asyncio.Queue[pb.SubscribeResponse] = field(default_factory=asyncio.Queue)
    broadcast: set[asyncio.Queue[pb.SubscribeResponse]] = field(default_factory=set)
    seed: asyncio.Queue[push_pb2.MessageReply] = field(default_factory=asyncio.Queue)


class MinimalBroker(broker_pb2_grpc.BrokerServicer):
    def __init__(self, channels: dict[str, _MinChannel]) -> None:
        self.channels = channels

    def _publish(self, request: pb.PublishRequest) -> pb.PublishResponse:
        name = request.channel
        ch = self.channels.get(name) or self.channels.setdefault(name, _MinChannel())
        first = ch.seq + 1
        ch.seq += len(request.messages)
        now_us = int(time.time() * 1e6)
        # Repeated fields filled in place, as the broker's servicer does (server/convert.py).
        frame = pb.SubscribeResponse()
        add = frame.deliveries.deliveries.add
        for seq, m in enumerate(request.messages, first):
            add(
                channel=name,
                seq=seq,
                id=m.id,
                payload=m.payload,
                attributes=m.attributes,
                publish_time_us=now_us,
                attempt=1,
                delivery_tag=seq,
            )
        if ch.broadcast:
            for q in ch.broadcast:
                q.put_nowait(frame)
        else:
            ch.queue.put_nowait(frame)
        response = pb.PublishResponse(ref=request.ref)
        add_result = response.results.add
        for seq in range(first, ch.seq + 1):
            add_result(seq=seq)
        return response

    async def Publish(self, request: pb.PublishRequest, context: Ctx) -> pb.PublishResponse:
        return self._publish(request)

    async def PublishStream(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Ctx
    ) -> AsyncIterator[pb.PublishResponse]:
        async for request in request_iterator:
            yield self._publish(request)

    async def Subscribe(self, request_iterator: AsyncIterator[pb.SubscribeRequest], context: Ctx) -> None:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        op = first.open
        ch = self.channels.setdefault(op.channel, _MinChannel())
        await context.write(_opened(op.channel, op.group))
        reader = asyncio.get_running_loop().create_task(_drain(request_iterator))
        queue = ch.queue
        if op.mode == pb.Open.BROADCAST:
            queue = asyncio.Queue()
            ch.broadcast.add(queue)
        try:
            while True:
                await context.write(await queue.get())
        finally:
            ch.broadcast.discard(queue)
            reader.cancel()


class MinimalSeed(push_pb2_grpc.MessageSyncServicer):
    def __init__(self, channels: dict[str, _MinChannel]) -> None:
        self.channels = channels
        self._received = push_pb2.SubmitReply(reply="received")

    async def SubmitMessage(self, request: push_pb2.SubmitRequest, context: Ctx) -> push_pb2.SubmitReply:
        ch = self.channels.setdefault(request.channel, _MinChannel())
        ch.seed.put_nowait(push_pb2.MessageReply(message=request.message))
        return self._received

    async def PushMessageStream(self, request: push_pb2.ConnRequest, context: Ctx) -> None:
        queue = self.channels.setdefault(request.channel, _MinChannel()).seed
        while True:
            await context.write(await queue.get())


# -- process ---------------------------------------------------------------------------------------


def build(kind: str) -> aio.Server:
    server = aio.server(options=_OPTIONS)
    if kind == "raw":
        frames, raw_channels = _Frames(), dict[str, _RawChannel]()
        broker_pb2_grpc.add_BrokerServicer_to_server(RawBroker(frames, raw_channels), server)  # type: ignore[no-untyped-call]
        push_pb2_grpc.add_MessageSyncServicer_to_server(RawSeed(frames, raw_channels), server)  # type: ignore[no-untyped-call]
    elif kind == "minimal":
        min_channels = dict[str, _MinChannel]()
        broker_pb2_grpc.add_BrokerServicer_to_server(MinimalBroker(min_channels), server)  # type: ignore[no-untyped-call]
        push_pb2_grpc.add_MessageSyncServicer_to_server(MinimalSeed(min_channels), server)  # type: ignore[no-untyped-call]
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    return server


async def _serve(kind: str, listen: str) -> None:
    server = build(kind)
    port = server.add_insecure_port(listen)
    await server.start()
    tune_collector()  # as the broker does: the baselines differ from it in their servicers only
    print(f"{kind} listening on {listen.rsplit(':', 1)[0]}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as the broker uses it."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pushchannel.bench._servers")
    parser.add_argument("kind", choices=["raw", "minimal"])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(args.kind, args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
