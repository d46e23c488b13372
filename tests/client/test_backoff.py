"""The retry schedule and the reconnect state machine, with an injected clock and random source:
no sleeps, no network."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
import pytest

import pushchannel
from pushchannel import ConnectionState, RetryPolicy, StateChange
from pushchannel.client import Backoff, Reconnector, backoff_ceiling
from pushchannel.client._wire import retryable

S = ConnectionState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ceilings_double_from_initial_to_max() -> None:
    policy = RetryPolicy()  # 0.1 s doubling to 30 s
    assert [backoff_ceiling(policy, n) for n in range(1, 11)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        6.4,
        12.8,
        25.6,
        30.0,
    ]
    assert backoff_ceiling(policy, 10_000) == 30.0  # no overflow, however long the outage
    assert backoff_ceiling(RetryPolicy(initial_backoff=1, max_backoff=5, multiplier=3), 2) == 3
    with pytest.raises(ValueError):
        backoff_ceiling(policy, 0)


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_full_jitter_stays_within_the_ceiling(draw: float) -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=30.0)
    backoff = Backoff(policy, random=lambda: draw, clock=FakeClock())
    for attempt in range(1, 40):
        delay = backoff.next_delay()
        assert delay == pytest.approx(draw * backoff_ceiling(policy, attempt))
        assert backoff.attempt == attempt


def test_jitter_spreads_over_the_whole_range() -> None:
    import random

    rng = random.Random(7)
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0)
    backoff = Backoff(policy, random=rng.random, clock=FakeClock())
    delays = [backoff.next_delay() for _ in range(2000)]
    assert all(d is not None and 0 <= d < 1.0 for d in delays)
    assert min(d for d in delays if d is not None) < 0.01
    assert max(d for d in delays if d is not None) > 0.99


def test_reset_starts_over() -> None:
    backoff = Backoff(RetryPolicy(), random=lambda: 1.0, clock=FakeClock())
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1) and backoff.attempt == 1


def test_deadline_gives_up_and_shortens_the_last_wait() -> None:
    clock = FakeClock()
    backoff = Backoff(
        RetryPolicy(initial_backoff=1, max_backoff=8, deadline=10), random=lambda: 1.0, clock=clock
    )
    waits = []
    while (delay := backoff.next_delay()) is not None:
        waits.append(delay)
        clock.now += delay + 0.5  # the wait, then an attempt that takes 0.5 s to fail
        assert len(waits) < 100
    # Failing since t=0: 1 + 2 + 4 s of waits and 1.5 s of attempts make 8.5 s, so the fourth
    # wait (8 s) is cut to the 1.5 s left; the attempt at the deadline fails, and it gives up.
    assert waits == [1, 2, 4, pytest.approx(1.5)]


def test_begin_counts_the_first_attempt_into_the_deadline() -> None:
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline=5), random=lambda: 0.5, clock=clock)
    backoff.begin()
    clock.now += 6  # the first attempt hung past the deadline
    assert backoff.next_delay() is None


def test_policy_is_validated() -> None:
    for bad in (
        dict(initial_backoff=0),
        dict(initial_backoff=2, max_backoff=1),
        dict(multiplier=0.5),
        dict(deadline=0),
        dict(attempt_timeout=0),
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_state_machine_walks_through_a_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pushchannel.client")
    clock = FakeClock()
    draws = iter([0.5, 0.25, 1.0])
    changes: list[StateChange] = []
    machine = Reconnector(
        "subscribe c (group g)",
        RetryPolicy(),
        listeners=[changes.append],
        random=lambda: next(draws),
        clock=clock,
    )
    assert machine.state is S.IDLE
    machine.connecting()
    machine.ready()
    error = pushchannel.Unavailable("connection reset")
    assert machine.failed(error) == pytest.approx(0.05)
    machine.connecting()
    assert machine.failed(error) == pytest.approx(0.05)  # attempt 2: 0.25 of 0.2
    machine.connecting()
    machine.ready()  # the backoff starts over
    assert machine.failed(error) == pytest.approx(0.1)
    machine.closed()
    machine.closed()  # idempotent

    assert [(c.state, c.attempt) for c in changes] == [
        (S.CONNECTING, 0),
        (S.READY, 0),
        (S.RECONNECTING, 1),
        (S.CONNECTING, 1),
        (S.RECONNECTING, 2),
        (S.CONNECTING, 2),
        (S.READY, 0),
        (S.RECONNECTING, 1),
        (S.CLOSED, 1),
    ]
    assert all(c.previous is p.state for p, c in itertools.pairwise(changes))
    assert changes[2].error is error and changes[2].delay == pytest.approx(0.05)
    assert changes[-1].error is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(changes)
    assert lines[2] == (
        "subscribe c (group g): reconnecting in 0.05 s (attempt 1) after UNAVAILABLE: connection reset"
    )
    assert [r.levelname for r in caplog.records][2] == "WARNING"


def test_state_machine_refuses_impossible_moves() -> None:
    machine = Reconnector("x", RetryPolicy())
    with pytest.raises(RuntimeError):
        machine.ready()  # never connected
    machine.closed()
    with pytest.raises(RuntimeError):
        machine.connecting()


def test_deadline_ends_in_closed_with_the_error() -> None:
    clock = FakeClock()
    machine = Reconnector("x", RetryPolicy(deadline=1), random=lambda: 1.0, clock=clock)
    machine.connecting()
    assert machine.failed(pushchannel.Unavailable("down")) is not None
    clock.now += 2
    machine.connecting()
    assert machine.failed(pushchannel.Unavailable("down")) is None  # the owner closes it
    assert machine.state is S.CONNECTING


def test_a_failing_listener_does_not_break_the_machine(caplog: pytest.LogCaptureFixture) -> None:
    def broken(change: StateChange) -> None:
        raise ValueError("oops")

    seen: list[StateChange] = []
    machine = Reconnector("x", RetryPolicy(), listeners=[broken, seen.append])
    machine.connecting()
    remove = machine.add_listener(seen.append)
    machine.ready()
    remove()
    machine.closed()
    assert [c.state for c in seen] == [S.CONNECTING, S.READY, S.READY, S.CLOSED]
    assert "a state listener failed" in caplog.text


async def test_changes_as_an_async_iterator() -> None:
    machine = Reconnector("x", RetryPolicy(), random=lambda: 0.0)
    seen: list[ConnectionState] = []

    async def follow() -> None:
        async for change in machine.changes():
            seen.append(change.state)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    machine.connecting()
    machine.failed(pushchannel.Unavailable())
    machine.connecting()
    machine.ready()
    machine.closed()
    await asyncio.wait_for(task, 1)
    assert seen == [S.CONNECTING, S.RECONNECTING, S.CONNECTING, S.READY, S.CLOSED]
    assert [c async for c in machine.changes()] == []  # closed: ends at once


@pytest.mark.parametrize(
    ("code", "subscribe", "publish"),
    [
        (grpc.StatusCode.UNAVAILABLE, True, True),
        (grpc.StatusCode.CANCELLED, True, True),  # e.g. a stream cut before it opened
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, True),
        (grpc.StatusCode.INTERNAL, True, True),  # how gRPC reports some resets
        (grpc.StatusCode.UNKNOWN, True, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, False),  # a full channel needs a person
        (grpc.StatusCode.INVALID_ARGUMENT, False, False),
        (grpc.StatusCode.PERMISSION_DENIED, False, False),
        (grpc.StatusCode.UNAUTHENTICATED, False, False),
        (grpc.StatusCode.FAILED_PRECONDITION, False, False),
        (grpc.StatusCode.NOT_FOUND, False, False),
        (grpc.StatusCode.UNIMPLEMENTED, False, False),
    ],
)
def test_which_failures_are_retried(code: grpc.StatusCode, subscribe: bool, publish: bool) -> None:
    assert retryable(code, publish=False) is subscribe
    assert retryable(code, publish=True) is publish
