"""Server lifecycle: build the store and the broker, serve both services on one port, stop
gracefully on SIGINT/SIGTERM (first signal drains, a second one exits at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

import grpc
from grpc import aio

from pushchannel._gc import tune_collector
from pushchannel._proto import push_pb2_grpc
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from pushchannel.config import ServerConfig
from pushchannel.core.broker import Broker
from pushchannel.errors import PushChannelError, Unavailable
from pushchannel.server.auth import Authorizer, check_exposure
from pushchannel.server.guard import guarded
from pushchannel.server.health import Health
from pushchannel.server.logs import ConnectionLog, configure_logging, redact_url
from pushchannel.server.metrics import Metrics, MetricsServer
from pushchannel.server.seed import MessageSyncServicer
from pushchannel.server.service import BrokerServicer
from pushchannel.server.tls import ServerTls
from pushchannel.store import open_store

__all__ = ["RunningServer", "ServerConfig", "serve", "start_server"]

log = logging.getLogger("pushchannel.server")

MAX_MESSAGE_BYTES = 16 << 20
HEALTH_PROBE_CHANNEL = "pushchannel.health-probe"  # read, never created


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
        # Per-connection limits against hostile clients (docs/security.md): streams open at once
        # on one connection, and request headers (a bearer token fits many times over).
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
        ("grpc.max_metadata_size", cfg.max_metadata_size),
        ("grpc.absolute_max_metadata_size", cfg.max_metadata_size),
        # channelz's per-connection records cost memory on every idle host connection.
        ("grpc.enable_channelz", 0),
    ]


class RunningServer:
    """A started broker: its port, its core, and how to stop it."""

    def __init__(
        self,
        server: aio.Server,
        broker: Broker,
        port: int,
        config: ServerConfig,
        auth: Authorizer | None = None,
        tls: ServerTls | None = None,
        health: Health | None = None,
        metrics: MetricsServer | None = None,
    ) -> None:
        self.auth = auth or Authorizer()
        self.tls = tls
        self.server = server
        self.broker = broker
        self.port = port
        self.config = config
        self.target = f"{config.listen.rsplit(':', 1)[0]}:{port}"
        self.health = health
        self.metrics = metrics  # None unless metrics_listen is set

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING; new calls are refused while subscriptions end with
        UNAVAILABLE (clients reconnect elsewhere) and calls in progress, publishes above all,
        get ``grace`` seconds to finish; the store closes last, after every answered publish."""
        grace = self.config.grace if grace is None else grace
        if self.health is not None:
            await self.health.drain()
        stopping = asyncio.get_running_loop().create_task(self.server.stop(grace))
        await self.broker.drain(Unavailable("the broker is shutting down: reconnect"))
        await stopping
        if self.metrics is not None:
            await self.metrics.stop()
        await self.broker.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    def reload(self) -> None:
        """SIGHUP: new TLS certificates for new connections, the auth file re-read (streams it
        no longer allows are closed); open streams stay. Bad files are logged and not used."""
        if self.tls is not None:
            self.tls.reload()
        self.auth.reload()


async def start_server(config: ServerConfig) -> RunningServer:
    auth = Authorizer.from_file(config.auth_file) if config.auth_file else Authorizer()
    mutual = config.tls_client_ca is not None
    check_exposure(config.listen, auth=auth.enabled, mutual_tls=mutual, insecure=config.insecure)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    store = open_store(config.store_url, fsync=config.fsync)
    metrics = Metrics(store) if config.metrics_listen is not None else None
    broker = Broker(store, config.broker, hooks=[ConnectionLog(), *([metrics] if metrics else [])])
    await broker.start()
    health = Health(lambda: store.last_seq(HEALTH_PROBE_CHANNEL))
    server = aio.server(options=grpc_options(config))
    push_pb2_grpc.add_MessageSyncServicer_to_server(MessageSyncServicer(broker, auth), guarded(server))  # type: ignore[no-untyped-call]
    broker_pb2_grpc.add_BrokerServicer_to_server(BrokerServicer(broker, auth), guarded(server))  # type: ignore[no-untyped-call]
    health.add_to(server)
    try:
        if tls is not None:
            port = server.add_secure_port(config.listen, tls.credentials())
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        await broker.close()
        raise Unavailable(f"cannot listen on {config.listen}: {exc}") from None
    if port == 0:
        await broker.close()
        raise Unavailable(f"cannot listen on {config.listen}: is the address in use?")
    await server.start()
    await health.start()
    running = RunningServer(server, broker, port, config, auth, tls, health)
    if metrics is not None and config.metrics_listen is not None:
        running.metrics = MetricsServer(metrics)
        try:
            await running.metrics.start(config.metrics_listen)
        except Unavailable:
            running.metrics = None
            await running.stop(0)
            raise
    return running


async def _serve(config: ServerConfig) -> int:
    running = await start_server(config)
    tune_collector()  # after start-up: see pushchannel._gc
    store = redact_url(config.store_url)
    experiments = os.environ.get("GRPC_EXPERIMENTS", "")
    fields = {"event": "listening", "listen": running.target, "store": store, "grpc_experiments": experiments}
    if running.metrics is not None and config.metrics_listen is not None:
        fields["metrics"] = f"{config.metrics_listen.rsplit(':', 1)[0]}:{running.metrics.port}"
    log.info("pushchannel listening on %s (store %s)", running.target, store, extra=fields)
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
    loop.add_signal_handler(signal.SIGHUP, running.reload)
    log.info(
        "security: tls %s, auth %s",
        ("mutual" if running.tls.mutual else "on") if running.tls else "off",
        f"from {config.auth_file}" if running.auth.enabled else "off",
    )
    waiter = loop.create_task(running.wait())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: draining for up to %g s", config.grace, extra={"event": "shutdown"})
    await running.stop()
    log.info("stopped", extra={"event": "stopped"})
    waiter.cancel()
    stopper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    return 0


def serve(config: ServerConfig) -> int:
    """Run a broker until SIGINT/SIGTERM; the exit code."""
    configure_logging(config.log_format)
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
