"""Long loops on the event loop (a sweep of every channel, a listing of every channel) whose
awaits may never suspend: the memory store's calls return at once, so such a loop would hold
every stream and publish until it ends."""

from __future__ import annotations

import asyncio
import time

__all__ = ["TimeSlice"]


class TimeSlice:
    """Call :meth:`tick` after each step of a long loop: once ``budget`` seconds have passed
    since the loop last let the event loop run, it does so (``await asyncio.sleep(0)``)."""

    __slots__ = ("_budget", "_end")

    def __init__(self, budget: float = 0.002) -> None:
        self._budget = budget
        self._end = time.perf_counter() + budget

    async def tick(self) -> None:
        if time.perf_counter() >= self._end:
            await asyncio.sleep(0)
            self._end = time.perf_counter() + self._budget
