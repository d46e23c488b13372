"""Prometheus metrics: a broker hook that counts, and an HTTP endpoint that serves them.

Counters are labelled by channel for the first :data:`CHANNEL_LABEL_CAP` channels this
process sees; every later channel counts under ``channel="_other"``, so the number of series
stays bounded however many channels come and go. Latency histograms carry no channel label.
Gauges that describe state (depth, bytes, oldest age, lag, pending, subscribers, in-flight)
are read at scrape time, on the event loop, for the labelled channels only.

Each :class:`Metrics` has a private registry, so several brokers can run in one process.
The endpoint is a small asyncio HTTP server (``GET /metrics``) on the broker's own loop: no
thread reads the broker's state while the loop changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pushchannel import __version__
from pushchannel.core.hooks import BrokerHooks
from pushchannel.core.model import Stored
from pushchannel.core.subscription import Subscription
from pushchannel.errors import Unavailable
from pushchannel.store.base import Store

__all__ = ["CHANNEL_LABEL_CAP", "OTHER", "ChannelLabels", "Metrics", "MetricsServer"]

log = logging.getLogger("pushchannel.metrics")

CHANNEL_LABEL_CAP = 100
OTHER = "_other"
SCRAPE_TIMEOUT = 5.0  # for the store reads behind the state gauges

PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Publish to first delivery: milliseconds for a connected host, days for one that was away.
DELIVERY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    86400.0,
)


class ChannelLabels:
    """The label of a channel: its own name for the first ``cap`` channels, then ``_other``."""

    __slots__ = ("_names", "cap")

    def __init__(self, cap: int = CHANNEL_LABEL_CAP) -> None:
        self.cap = cap
        self._names: dict[str, str] = {}

    def __call__(self, channel: str) -> str:
        label = self._names.get(channel)
        if label is not None:
            return label
        if len(self._names) >= self.cap:
            return OTHER  # not remembered: the map never outgrows the cap
        self._names[channel] = channel
        return channel

    @property
    def full(self) -> bool:
        return len(self._names) >= self.cap

    def labelled(self) -> list[str]:
        """The channels that have a label of their own."""
        return list(self._names)


class _Series:
    """The counter children of one channel label, looked up once."""

    __slots__ = (
        "acked",
        "dead_lettered",
        "delivered",
        "duplicates",
        "expired",
        "nacked",
        "published",
        "redelivered",
    )

    def __init__(self, m: Metrics, label: str) -> None:
        self.published = m.published.labels(label)
        self.duplicates = m.duplicates.labels(label)
        self.delivered = m.delivered.labels(label)
        self.acked = m.acked.labels(label)
        self.nacked = m.nacked.labels(label)
        self.redelivered = m.redelivered.labels(label)
        self.dead_lettered = m.dead_lettered.labels(label)
        self.expired = m.expired.labels(label)


class Metrics(BrokerHooks):
    """A broker hook feeding a private registry; :meth:`refresh` before each scrape."""

    def __init__(self, store: Store, *, channel_cap: int = CHANNEL_LABEL_CAP) -> None:
        self.store = store
        self.labels = ChannelLabels(channel_cap)
        self.registry = CollectorRegistry(auto_describe=True)
        reg, ch = self.registry, ["channel"]

        def counter(name: str, doc: str, labels: Sequence[str] = ch) -> Counter:
            return Counter(name, doc, labels, namespace="pushchannel", registry=reg)

        self.published = counter("published_messages", "Messages stored by publishes (duplicates not).")
        self.duplicates = counter("duplicate_messages", "Published messages dropped as duplicates by id.")
        self.delivered = counter(
            "delivered_messages", "Deliveries handed to subscriptions (redeliveries too)."
        )
        self.acked = counter("acked_messages", "Deliveries acked.")
        self.nacked = counter("nacked_messages", "Deliveries given back by nack.")
        self.redelivered = counter("redelivered_messages", "Messages claimed again after a deadline or nack.")
        self.dead_lettered = counter("dead_lettered_messages", "Messages moved to <channel>.dead-letter.")
        self.expired = counter("expired_messages", "Messages dropped because their ttl passed.")
        self.errors = counter("errors", "Failures of background tasks, by where.", ["where"])
        self.subscriptions = counter("subscriptions_opened", "Subscriptions opened, by mode.", ["mode"])
        self.publish_seconds = Histogram(
            "publish_duration_seconds",
            "Time to store one publish call (a batch), in seconds.",
            namespace="pushchannel",
            buckets=PUBLISH_BUCKETS,
            registry=reg,
        )
        self.delivery_latency = Histogram(
            "delivery_latency_seconds",
            "End to end: from publish to first delivery of a message, in seconds.",
            namespace="pushchannel",
            buckets=DELIVERY_BUCKETS,
            registry=reg,
        )
        info = Gauge(
            "build_info",
            "Always 1; the version as a label.",
            ["version"],
            namespace="pushchannel",
            registry=reg,
        )
        info.labels(__version__).set(1)
        Gauge(
            "start_time_seconds",
            "When the broker started, unix seconds.",
            namespace="pushchannel",
            registry=reg,
        ).set(time.time())
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self._series: dict[str, _Series] = {}
        self._subs: dict[str, Subscription] = {}
        self._state = _StateCollector()
        reg.register(self._state)

    def _of(self, channel: str) -> _Series:
        label = self.labels(channel)
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _Series(self, label)
        return series

    # -- hooks -----------------------------------------------------------------------------------
    def on_publish(self, channel: str, stored: int, duplicates: int, seconds: float) -> None:
        s = self._of(channel)
        s.published.inc(stored)
        if duplicates:
            s.duplicates.inc(duplicates)
        self.publish_seconds.observe(seconds)

    def on_deliver(self, channel: str, group: str, messages: Sequence[Stored], now: float) -> None:
        self._of(channel).delivered.inc(len(messages))
        observe = self.delivery_latency.observe
        for m in messages:
            if m.attempt == 1:
                observe(max(0.0, now - m.publish_time))

    def on_ack(self, channel: str, group: str, n: int) -> None:
        if n:
            self._of(channel).acked.inc(n)

    def on_nack(self, channel: str, group: str, n: int) -> None:
        if n:
            self._of(channel).nacked.inc(n)

    def on_redeliver(self, channel: str, group: str, n: int) -> None:
        self._of(channel).redelivered.inc(n)

    def on_dead_letter(self, channel: str, group: str, n: int) -> None:
        self._of(channel).dead_lettered.inc(n)

    def on_expired(self, channel: str, n: int) -> None:
        self._of(channel).expired.inc(n)

    def on_subscribe(self, sub: Subscription) -> None:
        self._subs[sub.id] = sub
        self.labels(sub.channel)
        self.subscriptions.labels("broadcast" if sub.broadcast else "queue").inc()

    def on_unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)

    def on_error(self, where: str, channel: str, exc: BaseException) -> None:
        self.errors.labels(where).inc()

    # -- scrape-time state -----------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read what the state gauges show; call on the broker's loop before rendering."""
        subscribers: dict[tuple[str, str], int] = {}
        in_flight: dict[str, int] = {}
        for sub in self._subs.values():
            label = self.labels(sub.channel)
            key = (label, "broadcast" if sub.broadcast else "queue")
            subscribers[key] = subscribers.get(key, 0) + 1
            in_flight[label] = in_flight.get(label, 0) + len(sub.in_flight)
        families = _subscriber_families(subscribers, in_flight)
        store_up = 1.0
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                families += await self._channel_families()
        except Exception as exc:  # the store is down or slow: say so, and serve the rest
            log.warning(
                "metrics: cannot read channel state: %s", exc, extra={"event": "error", "where": "metrics"}
            )
            store_up = 0.0
        up = GaugeMetricFamily("pushchannel_store_up", "1 if the last scrape could read the store.")
        up.add_metric([], store_up)
        families.append(up)
        self._state.families = families

    async def _channel_families(self) -> list[Metric]:
        store, labels = self.store, self.labels
        if not labels.full:  # channels stored before this process started get labels too
            for name in await store.channels():
                if labels(name) == OTHER:
                    break
        now = time.time()
        depth = _channel_gauge("channel_depth", "Messages stored on the channel.")
        size = _channel_gauge("channel_bytes", "Payload bytes stored on the channel.")
        age = _channel_gauge("channel_oldest_age_seconds", "Age of the oldest stored message (0: empty).")
        lag = _channel_gauge("channel_lag", "Messages not yet delivered to the channel's most-behind group.")
        pending = _channel_gauge("channel_pending", "Deliveries awaiting an ack, over all durable groups.")
        for name in labels.labelled():
            stats = await store.stats(name)
            if stats is None:  # deleted
                continue
            depth.add_metric([name], stats.depth)
            size.add_metric([name], stats.bytes)
            age.add_metric(
                [name], max(0.0, now - stats.oldest_publish_time) if stats.oldest_publish_time else 0.0
            )
            lag.add_metric([name], max((g.lag for g in stats.groups), default=0))
            pending.add_metric([name], sum(g.pending for g in stats.groups))
        return [depth, size, age, lag, pending]


def _channel_gauge(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"pushchannel_{name}", doc, labels=["channel"])


def _subscriber_families(subscribers: dict[tuple[str, str], int], in_flight: dict[str, int]) -> list[Metric]:
    subs = GaugeMetricFamily(
        "pushchannel_subscribers", "Subscriptions connected to this broker.", labels=["channel", "mode"]
    )
    for (label, mode), n in sorted(subscribers.items()):
        subs.add_metric([label, mode], n)
    flying = GaugeMetricFamily(
        "pushchannel_in_flight_messages",
        "Deliveries out on subscriptions and not yet acked.",
        labels=["channel"],
    )
    for label, n in sorted(in_flight.items()):
        flying.add_metric([label], n)
    return [subs, flying]


class _StateCollector(Collector):
    """Serves what :meth:`Metrics.refresh` read last."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on the broker's event loop; one request per connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.port = 0  # the bound port, once started
        self._server: asyncio.Server | None = None

    async def start(self, listen: str) -> None:
        """Listen on ``HOST:PORT`` (port 0: any free port, see :attr:`port`)."""
        host, _, port = listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        except OSError as exc:
            raise Unavailable(f"cannot listen for metrics on {listen}: {exc.strerror or exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                path = target.split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
                elif path == "/metrics":
                    await self.metrics.refresh()
                    status, ctype, body = (
                        "200 OK",
                        CONTENT_TYPE_LATEST,
                        generate_latest(self.metrics.registry),
                    )
                elif path == "/":
                    status, ctype, body = "200 OK", "text/plain", b"pushchannel: metrics at /metrics\n"
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"not found: try /metrics\n"
                header = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                writer.write(header.encode("latin-1") + (body if method != "HEAD" else b""))
                await writer.drain()
        except (
            TimeoutError,
            ValueError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that went away or spoke something else: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
