"""Prometheus metrics, scraped over HTTP from a real broker after real traffic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pushchannel.config import BrokerConfig
from pushchannel.core.model import ChannelPolicy, NewMessage, Stored
from pushchannel.server.app import RunningServer, ServerConfig, start_server
from pushchannel.server.metrics import OTHER, ChannelLabels, Metrics
from pushchannel.store.memory import MemoryStore
from tests.ops._util import http_get, scrape, value
from tests.server.helpers import Subscriber, eventually, msg, publish, stub

pytestmark = pytest.mark.timeout(60)

CONFIG = BrokerConfig(heartbeat_interval=0.5, retention_interval=0.1, max_delivery_attempts=2)


@pytest.fixture(params=["memory", "sqlite"])
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/m.db"
    server = await start_server(
        ServerConfig(
            listen="127.0.0.1:0", store_url=url, broker=CONFIG, grace=0.5, metrics_listen="127.0.0.1:0"
        )
    )
    try:
        yield server
    finally:
        await server.stop(0.5)


async def test_counters_gauges_and_histograms_match_the_traffic(running: RunningServer) -> None:
    assert running.metrics is not None
    port = running.metrics.port
    async with grpc.aio.insecure_channel(running.target) as channel:
        broker = stub(channel)
        # 5 new messages in two calls, then one retry that is a duplicate.
        await publish(broker, "m.a", *(msg(f"a{i}", id=f"a{i}") for i in range(3)))
        await publish(broker, "m.a", msg("a3", id="a3"), msg("a4", id="a4"))
        (dup,) = await publish(broker, "m.a", msg("a0", id="a0"))
        assert dup.duplicate

        async with Subscriber(channel) as sub:
            await sub.open("m.a", max_in_flight=10)
            first = await sub.take(5)
            sub.ack(*(d.delivery_tag for d in first[:3]))
            sub.nack(first[3].delivery_tag)
            (again,) = await sub.take(1)
            assert again.attempt == 2
            sub.ack(again.delivery_tag)  # first[4] stays in flight

            async def settled() -> bool:
                s = await scrape(port)
                return value(s, "pushchannel_acked_messages_total", channel="m.a") == 4

            await eventually(settled)
            s = await scrape(port)
            assert value(s, "pushchannel_published_messages_total", channel="m.a") == 5
            assert value(s, "pushchannel_duplicate_messages_total", channel="m.a") == 1
            assert value(s, "pushchannel_delivered_messages_total", channel="m.a") == 6
            assert value(s, "pushchannel_nacked_messages_total", channel="m.a") == 1
            assert value(s, "pushchannel_redelivered_messages_total", channel="m.a") == 1
            assert value(s, "pushchannel_in_flight_messages", channel="m.a") == 1
            assert value(s, "pushchannel_subscribers", channel="m.a", mode="queue") == 1
            assert value(s, "pushchannel_subscriptions_opened_total", mode="queue") == 1
            assert value(s, "pushchannel_publish_duration_seconds_count") == 3
            # End to end counts first deliveries only: the redelivery is not a new message.
            assert value(s, "pushchannel_delivery_latency_seconds_count") == 5
            assert 0 < value(s, "pushchannel_delivery_latency_seconds_sum") < 10
            assert value(s, "pushchannel_store_up") == 1

            async def trimmed() -> bool:  # acked messages leave the store
                return value(await scrape(port), "pushchannel_channel_depth", channel="m.a") == 1

            await eventually(trimmed)
            s = await scrape(port)
            assert value(s, "pushchannel_channel_bytes", channel="m.a") == 2
            assert value(s, "pushchannel_channel_pending", channel="m.a") == 1
            assert value(s, "pushchannel_channel_lag", channel="m.a") == 0

        async def gone() -> bool:
            return value(await scrape(port), "pushchannel_subscribers", channel="m.a", mode="queue") == 0

        await eventually(gone)


async def test_dead_letters_and_expiry_are_counted(running: RunningServer) -> None:
    assert running.metrics is not None
    port = running.metrics.port
    async with grpc.aio.insecure_channel(running.target) as channel:
        broker = stub(channel)
        await publish(broker, "m.dl", "poison")
        await publish(broker, "m.ttl", msg("late", ttl_ms=1))
        async with Subscriber(channel) as sub:
            await sub.open("m.dl")
            for _ in range(2):  # max_delivery_attempts=2: the third claim dead-letters it
                (d,) = await sub.take(1)
                sub.nack(d.delivery_tag, reason="bad")
            await eventually(
                lambda: _equals(port, "pushchannel_dead_lettered_messages_total", 1, channel="m.dl")
            )
        async with Subscriber(channel) as sub:
            await sub.open("m.ttl")
            await eventually(lambda: _equals(port, "pushchannel_expired_messages_total", 1, channel="m.ttl"))
            assert await sub.collect_for(0.2) == []
        s = await scrape(port)
        assert value(s, "pushchannel_redelivered_messages_total", channel="m.dl") == 2
        assert value(s, "pushchannel_delivered_messages_total", channel="m.dl") == 2
        assert value(s, "pushchannel_delivered_messages_total", channel="m.ttl") == 0
        # The dead-letter channel is a channel of its own, with a depth.
        assert value(s, "pushchannel_channel_depth", channel="m.dl.dead-letter") == 1


async def _equals(port: int, name: str, expected: float, **labels: str) -> bool:
    return value(await scrape(port), name, **labels) == expected


async def test_the_endpoint_answers_only_metrics(running: RunningServer) -> None:
    assert running.metrics is not None
    base = f"http://127.0.0.1:{running.metrics.port}"
    status, body = await http_get(base + "/metrics")
    assert status == 200 and "pushchannel_build_info" in body and "process_" in body
    assert (await http_get(base + "/nope"))[0] == 404


async def test_each_server_has_its_own_registry(running: RunningServer) -> None:
    other = await start_server(
        ServerConfig(listen="127.0.0.1:0", store_url="memory://", grace=0.5, metrics_listen="127.0.0.1:0")
    )
    try:
        assert other.metrics is not None and running.metrics is not None
        async with grpc.aio.insecure_channel(other.target) as channel:
            await publish(stub(channel), "m.own", "x", "y")
        assert (
            value(await scrape(other.metrics.port), "pushchannel_published_messages_total", channel="m.own")
            == 2
        )
        assert (
            value(await scrape(running.metrics.port), "pushchannel_published_messages_total", channel="m.own")
            == 0
        )
    finally:
        await other.stop(0.5)


async def test_metrics_are_off_unless_asked_for() -> None:
    server = await start_server(ServerConfig(listen="127.0.0.1:0", store_url="memory://", grace=0.5))
    try:
        assert server.metrics is None
    finally:
        await server.stop(0.5)


def test_channel_labels_are_capped() -> None:
    labels = ChannelLabels(cap=2)
    assert [labels(c) for c in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert labels.labelled() == ["a", "b"] and labels.full


async def test_series_stay_bounded_however_many_channels() -> None:
    store = MemoryStore()
    await store.start()
    metrics = Metrics(store, channel_cap=3)
    names = [f"ch.{i}" for i in range(10)]
    for name in names:
        await store.append(name, [NewMessage(b"p")], 0.0, ChannelPolicy())
        metrics.on_publish(name, 1, 0, 0.001)
        metrics.on_deliver(name, "default", [Stored(1, "", b"p", {}, 0.0)], 0.5)
    await metrics.refresh()
    samples = [
        s
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    ]
    published = {
        s.labels["channel"]: s.value for s in samples if s.name == "pushchannel_published_messages_total"
    }
    assert published == {"ch.0": 1, "ch.1": 1, "ch.2": 1, OTHER: 7}
    depth = {s.labels["channel"] for s in samples if s.name == "pushchannel_channel_depth"}
    assert depth == {"ch.0", "ch.1", "ch.2"}
    await store.close()


async def test_a_store_that_fails_is_reported_not_fatal() -> None:
    class Broken(MemoryStore):
        async def channels(self) -> list[str]:
            raise OSError("disk on fire")

    store = Broken()
    metrics = Metrics(store)
    await metrics.refresh()
    text = generate_latest(metrics.registry).decode()
    assert "pushchannel_store_up 0.0" in text
    assert "pushchannel_build_info" in text
