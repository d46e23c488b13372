"""The garbage collector's settings for a long-running process full of streams: the broker,
and the benchmark's baseline servers and load process, so that all of them run alike."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["THRESHOLDS", "tune_collector", "tuned_collector"]

#: The young and middle thresholds (Python's: 700, 10); the oldest keeps Python's rule.
THRESHOLDS = (2000, 300)


def tune_collector() -> None:
    """Collect once and freeze what start-up allocated, then set :data:`THRESHOLDS`.

    - What start-up allocated (modules, gRPC, protobuf) lives as long as the process: frozen,
      it stays out of the collector's full passes, each of which stalls every stream.
    - A broadcast to thousands of streams holds that many writes' objects at once, and each
      pass that runs in the middle of it promotes them all. With Python's thresholds the
      promoted objects soon set off full passes over every stream, which were half the
      server's CPU in a 1 -> 5,000 broadcast. Young passes stay small (a large young threshold
      makes each one a stall of milliseconds); the middle generation is collected every
      600,000 allocations, not 7,000; full passes keep their rule, so cycles are still freed.
    """
    gc.collect()
    gc.freeze()
    _, _, oldest = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS, oldest)


@contextlib.contextmanager
def tuned_collector() -> Iterator[None]:
    """:func:`tune_collector` for a while (a benchmark run inside a longer process, such as
    the test suite's), then the settings it found."""
    before = gc.get_threshold()
    tune_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
