"""The collector settings the broker, the baselines and the bench load run with."""

from __future__ import annotations

import gc

from pushchannel._gc import THRESHOLDS, tuned_collector


def test_tuned_collector_freezes_start_up_sets_thresholds_and_gives_them_back() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with tuned_collector():
        young, middle, oldest = gc.get_threshold()
        assert (young, middle) == THRESHOLDS
        assert oldest == before[2]  # full passes keep Python's rule
        assert gc.get_freeze_count() > 0  # what existed before is out of the passes
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
