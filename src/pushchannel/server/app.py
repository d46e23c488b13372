"""Server lifecycle: build the store and the broker, serve both services on one port, stop
gracefully on SIGINT/SIGTERM (first signal drains, a second one exits at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

import grpc
from grpc import aio

from pushchannel._proto import push_pb2_grpc
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from pushchannel.config import ServerConfig
from pushchannel.core.broker import Broker
from pushchannel.errors import PushChannelError, Unavailable
from pushchannel.server.seed import MessageSyncServicer
from pushchannel.server.service import BrokerServicer
from pushchannel.store import open_store

__all__ = ["RunningServer", "ServerConfig", "serve", "start_server"]

log = logging.getLogger("pushchannel.server")

MAX_MESSAGE_BYTES = 16 << 20


def grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients ping every 20 s by default; accept pings down to 5 s apart before
        # answering GOAWAY too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
    ]


class RunningServer:
    """A started broker: its port, its core, and how to stop it."""

    def __init__(self, server: aio.Server, broker: Broker, port: int, config: ServerConfig) -> None:
        self.server = server
        self.broker = broker
        self.port = port
        self.config = config
        self.target = f"{config.listen.rsplit(':', 1)[0]}:{port}"

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, end subscriptions with UNAVAILABLE, let publishes in progress
        finish within ``grace`` seconds, then close the store."""
        grace = self.config.grace if grace is None else grace
        await self.broker.close(Unavailable("the broker is shutting down: reconnect"))
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig) -> RunningServer:
    store = open_store(config.store_url, fsync=config.fsync)
    broker = Broker(store, config.broker)
    await broker.start()
    server = aio.server(options=grpc_options(config))
    push_pb2_grpc.add_MessageSyncServicer_to_server(MessageSyncServicer(broker), server)  # type: ignore[no-untyped-call]
    broker_pb2_grpc.add_BrokerServicer_to_server(BrokerServicer(broker), server)  # type: ignore[no-untyped-call]
    try:
        port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        await broker.close()
        raise Unavailable(f"cannot listen on {config.listen}: {exc}") from None
    if port == 0:
        await broker.close()
        raise Unavailable(f"cannot listen on {config.listen}: is the address in use?")
    await server.start()
    return RunningServer(server, broker, port, config)


async def _serve(config: ServerConfig) -> int:
    running = await start_server(config)
    log.info("pushchannel listening on %s (store %s)", running.target, config.store_url)
    print(
        f"pushchannel listening on {running.target} (store {config.store_url})", file=sys.stderr, flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # second signal: stop waiting for the drain
            log.warning("second signal: exiting now")
            for task in asyncio.all_tasks(loop):
                task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    waiter = loop.create_task(running.wait())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    print("pushchannel: shutting down", file=sys.stderr, flush=True)
    await running.stop()
    waiter.cancel()
    stopper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    return 0


def serve(config: ServerConfig) -> int:
    """Run a broker until SIGINT/SIGTERM; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop  # an optional extra: grpc.aio streams faster on it

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_serve(config))
    except PushChannelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except grpc.RpcError as exc:  # pragma: no cover
        print(f"error: {exc}", file=sys.stderr)
        return 1
