"""The retention sweep: every channel is trimmed within the sweep period, a share at each tick,
so that a broker with many channels never holds the event loop for the whole sweep at once.
A real broker core on a real event loop, over the memory store (whose trims never suspend)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from pushchannel.config import BrokerConfig
from pushchannel.core import broker as broker_module
from pushchannel.core.broker import Broker
from pushchannel.core.model import ChannelPolicy, NewMessage
from pushchannel.store.memory import MemoryStore

CHANNELS = 200
TICK = 0.05
PERIOD = 1.0  # 20 ticks a sweep: a share of 10 channels a tick


async def test_quiet_channels_are_all_trimmed_within_the_period_a_share_per_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker_module, "_SWEEP_PERIOD", PERIOD)
    store = MemoryStore()
    await store.start()
    policy = ChannelPolicy(max_age=60.0)
    # Aged-out messages the broker never touched (as after a restart on a durable store): only
    # the sweep finds them.
    long_ago = time.time() - 3600
    names = [f"quiet.{i}" for i in range(CHANNELS)]
    for name in names:
        await store.append(name, [NewMessage(b"old")], long_ago, policy)

    ticks: Counter[int] = Counter()  # trims per retention tick
    trim = store.trim

    async def counted_trim(*args: object, **kwargs: object) -> object:
        ticks[round((time.monotonic() - started) / TICK)] += 1
        return await trim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "trim", counted_trim)
    broker = Broker(store, BrokerConfig(retention_interval=TICK, default_policy=policy))
    started = time.monotonic()
    await broker.start()
    try:
        deadline = time.monotonic() + PERIOD * 5
        while time.monotonic() < deadline:
            depths = [(await store.stats(n)).depth for n in names]  # type: ignore[union-attr]
            if not any(depths):
                break
            await asyncio.sleep(TICK)
        assert not any(depths), f"{sum(map(bool, depths))} channels still hold aged-out messages"
        elapsed = time.monotonic() - started
    finally:
        await broker.close()
    assert sum(ticks.values()) >= CHANNELS
    share = -(-CHANNELS // round(PERIOD / TICK))
    assert max(ticks.values()) <= share, f"a tick trimmed {max(ticks.values())} channels: {ticks}"
    assert len(ticks) >= CHANNELS // share  # spread over the period, not done at once
    assert elapsed >= PERIOD * 0.5  # ...which takes most of the period (bounded above by the loop)
