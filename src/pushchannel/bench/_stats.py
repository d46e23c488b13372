"""Small statistics and timing helpers shared by the drivers and the peers."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(statistics.median(finite)) if finite else math.nan


def latency_figures(latencies_ns: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds."""
    values = sorted(latencies_ns)
    ms = 1e-6
    return {
        "p50_ms": percentile(values, 50) * ms,
        "p99_ms": percentile(values, 99) * ms,
        "p999_ms": percentile(values, 99.9) * ms,
        "max_ms": (values[-1] * ms) if values else math.nan,
    }


def stamp(payload_size: int) -> bytes:
    """A payload of ``payload_size`` bytes (at least 8) that starts with the send time."""
    return time.perf_counter_ns().to_bytes(8, "little") + b"x" * max(0, payload_size - 8)


def age_ns(payload: bytes, now_ns: int) -> int:
    return now_ns - int.from_bytes(payload[:8], "little")


class Counter:
    """Counts deliveries until ``expected``; remembers when the last one needed arrived."""

    __slots__ = ("count", "done", "expected", "finished_at")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.finished_at = math.nan
        self.done = asyncio.Event()
        if expected <= 0:
            self.finished_at = time.perf_counter()
            self.done.set()

    def add(self, n: int) -> None:
        self.count += n
        if self.count >= self.expected and not self.done.is_set():
            self.finished_at = time.perf_counter()
            self.done.set()


class Pacer:
    """Fixed-rate schedule: ``await pacer.next()`` returns at t0 + i / rate."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.t0 = time.perf_counter()
        self.i = 0

    async def next(self) -> None:
        due = self.t0 + self.i * self.interval
        self.i += 1
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
