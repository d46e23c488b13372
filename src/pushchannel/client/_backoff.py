"""The retry schedule: exponential backoff with full jitter, free of I/O.

The random source and the clock are arguments, so the schedule is tested with plain numbers
and no sleeps; the reconnect state machine and the publish retries both use it.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable

from pushchannel.client._types import RetryPolicy

Random = Callable[[], float]
"""A source of uniform floats in ``[0, 1)``, such as :func:`random.random`."""
Clock = Callable[[], float]
"""Seconds on a monotonic clock, such as :func:`time.monotonic`."""


def backoff_ceiling(policy: RetryPolicy, attempt: int) -> float:
    """The longest wait after the ``attempt``-th consecutive failure (1-based)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    # Capped before exponentiating far: 2 ** 10_000 overflows a float.
    exponent = min(attempt - 1, 1000)
    try:
        ceiling = policy.initial_backoff * policy.multiplier**exponent
    except OverflowError:
        return policy.max_backoff
    return min(policy.max_backoff, ceiling)


class Backoff:
    """The delays of one operation's consecutive failures.

    :meth:`next_delay` is called after each failure: the n-th call returns a delay drawn
    uniformly from ``[0, backoff_ceiling(policy, n)]``, or ``None`` once the policy's
    ``deadline`` has passed since the operation began failing (or since :meth:`begin`). The last
    delay before the deadline is shortened so that one more attempt lands on it. :meth:`reset`
    after a success starts the count again.
    """

    __slots__ = ("_clock", "_random", "_started", "attempt", "policy")

    def __init__(
        self, policy: RetryPolicy, *, random: Random = _random.random, clock: Clock = time.monotonic
    ) -> None:
        self.policy = policy
        self._random = random
        self._clock = clock
        self._started: float | None = None
        self.attempt = 0  # failures since the last reset

    def begin(self) -> None:
        """Start the deadline's clock now, unless it runs already (e.g. when a call starts, so
        that the deadline covers the first attempt too)."""
        if self._started is None:
            self._started = self._clock()

    def next_delay(self) -> float | None:
        """Count a failure; the wait before the next attempt, or ``None`` to give up."""
        now = self._clock()
        if self._started is None:
            self._started = now
        self.attempt += 1
        delay = backoff_ceiling(self.policy, self.attempt) * self._random()
        deadline = self.policy.deadline
        if deadline is None:
            return delay
        remaining = self._started + deadline - now
        if remaining <= 0:
            return None
        return min(delay, remaining)

    def reset(self) -> None:
        """A success: the next failure is the first again."""
        self.attempt = 0
        self._started = None
