"""The retention sweep: every channel is trimmed within the sweep period, a share at each tick,
so that a broker with many channels never holds the event loop for the whole sweep at once.
A real broker core on a real event loop, over the memory store (whose trims never suspend) and
the SQLite store (whose trims are answered by its writer thread, so they are sent together)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from pushchannel.config import BrokerConfig
from pushchannel.core import broker as broker_module
from pushchannel.core.broker import Broker
from pushchannel.core.model import ChannelPolicy, NewMessage
from pushchannel.core.timeslice import TimeSlice
from pushchannel.store.base import Store
from pushchannel.store.memory import MemoryStore
from pushchannel.store.sqlite import SQLiteStore

CHANNELS = 200
TICK = 0.05
PERIOD = 1.0  # 20 ticks a sweep: a share of 10 channels a tick


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_quiet_channels_are_all_trimmed_within_the_period_a_share_per_tick(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    monkeypatch.setattr(broker_module, "_SWEEP_PERIOD", PERIOD)
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(f"sqlite:///{tmp_path}/sweep.db")
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
    at_once = peak = 0

    async def counted_trim(*args: object, **kwargs: object) -> object:
        nonlocal at_once, peak
        ticks[round((time.monotonic() - started) / TICK)] += 1
        at_once += 1
        peak = max(peak, at_once)
        try:
            return await trim(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            at_once -= 1

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
    # A store with I/O gets a tick's trims together (one round trip, one SQLite transaction).
    assert peak == (1 if store.immediate else share), f"{peak} trims at once"


async def _returns_at_once() -> None:
    return None


async def test_a_time_slice_lets_the_loop_run_during_a_loop_that_never_suspends() -> None:
    """What keeps the sweep and the channel listing from holding every stream: 40 ms of steps
    that never suspend let another task run every 2 ms or so; without ticks, only at the end."""

    async def steps(pause: TimeSlice | None) -> None:
        end = time.perf_counter() + 0.04
        while time.perf_counter() < end:
            await _returns_at_once()  # a memory-store call
            if pause is not None:
                await pause.tick()

    async def count_turns(run: asyncio.Task[None]) -> int:
        turns = 0
        while not run.done():
            turns += 1
            await asyncio.sleep(0)
        return turns

    # With ticks: at least one turn besides the first (however the machine schedules us), and
    # never more than one per 2 ms of the 40 ms.
    for pause, least, most in ((None, 1, 1), (TimeSlice(0.002), 2, 21)):
        run = asyncio.get_running_loop().create_task(steps(pause))
        turns = await count_turns(run)
        assert least <= turns <= most, (pause, turns)
