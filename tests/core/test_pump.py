"""The dispatch pump's runners (a task of its own, or the caller's task) and its lazy timer;
the subscription's lazy heartbeat timer. Real classes on a real event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from pushchannel.core.broker import Broker
from pushchannel.core.dispatch import Pump
from pushchannel.core.model import NewMessage, StartSpec, Stored
from pushchannel.core.subscription import IdleClock, SubscribeParams, Subscription
from pushchannel.store.memory import MemoryStore


class Rounds(Pump):
    """Counts its rounds and who ran them; ``work`` rounds make progress, and a round may
    pause on ``gate`` (a store call that takes a while)."""

    def __init__(self, work: int = 0) -> None:
        super().__init__()
        self.work = work
        self.rounds = 0
        self.runners: list[asyncio.Task[object] | None] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.wake: float | None = None

    async def pump_once(self) -> bool:
        self.rounds += 1
        self.runners.append(asyncio.current_task())
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.work > 0:
            self.work -= 1
            return True
        return False

    def next_wake(self) -> float | None:
        return self.wake


async def test_run_here_runs_every_round_in_the_callers_task() -> None:
    pump = Rounds(work=3)
    await pump.run_here()
    me = asyncio.current_task()
    assert pump.rounds == 4  # three that moved something, one that found nothing
    assert all(t is me for t in pump.runners)


async def test_a_kick_during_a_round_in_the_caller_makes_it_go_round_again() -> None:
    pump = Rounds()
    pump.gate = asyncio.Event()
    runner = asyncio.create_task(pump.run_here())
    await pump.entered.wait()
    pump.kick()  # a publish lands while the round is out at the store
    await pump.run_here()  # so does another publisher's: it leaves the round to the runner
    assert pump.rounds == 1
    pump.gate.set()
    await asyncio.wait_for(runner, 5)
    assert pump.rounds == 2  # one more round for the kicks, in the same caller
    assert pump.runners == [runner, runner]


async def test_run_here_while_a_task_runs_it_only_marks_it() -> None:
    pump = Rounds()
    pump.gate = asyncio.Event()
    pump.kick()
    await pump.entered.wait()
    task = pump.runners[0]
    assert task is not asyncio.current_task()
    await pump.run_here()
    pump.gate.set()
    for _ in range(100):
        if not pump._busy:
            break
        await asyncio.sleep(0.01)
    assert pump.rounds == 2
    assert pump.runners == [task, task]


async def test_a_cancelled_caller_hands_the_rest_to_a_task() -> None:
    pump = Rounds(work=1)
    pump.gate = asyncio.Event()
    caller = asyncio.create_task(pump.run_here())
    await pump.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    pump.gate.set()
    for _ in range(100):
        if pump.rounds >= 2 and not pump._busy:
            break
        await asyncio.sleep(0.01)
    assert pump.rounds >= 2, "nobody finished the cancelled caller's work"
    assert pump.runners[-1] is not caller


async def test_stop_waits_for_the_callers_round_not_for_the_caller() -> None:
    pump = Rounds()
    pump.gate = asyncio.Event()
    caller_done = asyncio.Event()

    async def publisher() -> None:
        await pump.run_here()
        await caller_done.wait()  # the publisher goes on with other work after its round

    caller = asyncio.create_task(publisher())
    await pump.entered.wait()
    stopping = asyncio.create_task(pump.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # the round is still out at the store
    pump.gate.set()
    await asyncio.wait_for(stopping, 2)  # done when the round is, though the caller is not
    assert not caller.done()
    caller_done.set()
    await caller
    pump.kick()
    await pump.run_here()
    assert pump.rounds == 1  # stopped: no more rounds


async def test_an_earlier_timer_stays_and_a_fired_one_is_set_again() -> None:
    pump = Rounds()
    pump.wake = time.time() + 0.05
    await pump.run_here()
    first = pump._timer
    assert first is not None
    pump.wake = time.time() + 30  # a later wake (a lease pushed on) keeps the earlier timer
    await pump.run_here()
    assert pump._timer is first
    for _ in range(100):  # it fires: one round, which sets the later one
        if pump.rounds >= 3:
            break
        await asyncio.sleep(0.01)
    assert pump.rounds == 3
    assert pump._timer is not None and pump._timer is not first
    assert pump._timer_at == pump.wake
    pump.wake = time.time() + 0.01  # an earlier wake replaces it
    await pump.run_here()
    assert pump._timer_at == pump.wake
    pump.wake = None
    await pump.run_here()
    assert pump._timer is None
    await pump.stop()


async def test_a_publish_on_an_immediate_store_hands_the_message_out_before_it_returns() -> None:
    broker = Broker(MemoryStore())
    await broker.start()
    try:
        assert broker.store.immediate
        sub = await broker.subscribe(SubscribeParams(channel="c", start=StartSpec("earliest")))
        await asyncio.sleep(0.05)  # the subscribe's own round (a task) finds nothing and ends
        await broker.publish("c", [NewMessage(b"one")])
        assert sub.in_flight, "the dispatch round ran inside the publish"
        batch = await sub.next_batch(1.0)
        assert batch is not None and [m.payload for m in batch] == [b"one"]
    finally:
        await broker.close()


async def test_a_stream_woken_by_a_publish_takes_its_delivery_before_the_publish_returns() -> None:
    """On an immediate store the publish yields once after its dispatch round: the stream it
    woke writes first, and the publish is answered after (grpc.aio's send of the answer took
    about 100 us, which every delivery waited for)."""
    broker = Broker(MemoryStore())
    await broker.start()
    try:
        sub = await broker.subscribe(SubscribeParams(channel="c", start=StartSpec("earliest")))
        await asyncio.sleep(0.05)
        taken: list[bytes] = []

        async def stream() -> None:
            batch = await sub.next_batch(5.0)
            taken.extend(m.payload for m in batch or [])

        writer = asyncio.get_running_loop().create_task(stream())
        await asyncio.sleep(0)  # the stream waits for its next batch
        await broker.publish("c", [NewMessage(b"one")])
        assert taken == [b"one"], "the woken stream had not run when the publish returned"
        await writer
    finally:
        await broker.close()


def _message(seq: int) -> Stored:
    return Stored(seq=seq, id="", payload=b"x", attributes={}, publish_time=0.0)


def _subscription(clock: IdleClock | None = None) -> Subscription:
    clock = clock or IdleClock()
    return Subscription("s-1", SubscribeParams(channel="c"), "default", "peer", time.time(), clock)


async def test_heartbeat_after_a_quiet_interval_though_earlier_waits_got_data() -> None:
    clock = IdleClock()
    sub = _subscription(clock)
    ticks = set()
    for seq in range(1, 4):  # busy: each wait ends with data; the one wake-up is not moved each time
        waiting = asyncio.create_task(sub.next_batch(0.2))
        await asyncio.sleep(0.05)
        ticks.add(sub._idle_tick)
        sub.push([_message(seq)], float("inf"))
        assert await waiting == [_message(seq)]
    assert len(ticks) == 1 and 0 not in ticks
    t0 = time.monotonic()
    assert await sub.next_batch(0.2) is None  # then quiet: a heartbeat, a full interval later
    waited = time.monotonic() - t0
    assert 0.19 <= waited < 2.0
    assert clock.waiting() == 0
    sub.close()
    assert sub._idle_tick == 0 and clock.waiting() == 0


async def test_many_subscriptions_wait_on_one_loop_timer_and_none_wakes_early() -> None:
    clock = IdleClock(resolution=0.05)
    subs = [_subscription(clock) for _ in range(200)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def wait(sub: Subscription, timeout: float) -> float:
        assert await sub.next_batch(timeout) is None
        return loop.time()  # when it woke

    waits = [asyncio.create_task(wait(s, 0.1 + 0.001 * i)) for i, s in enumerate(subs)]
    await asyncio.sleep(0)
    assert clock.waiting() == 200
    assert len({s._idle_tick for s in subs}) <= 8  # 0.1..0.3 s in 0.05 s ticks: shared buckets
    done_at = await asyncio.gather(*waits)
    for i, t in enumerate(done_at):
        assert t - t0 >= 0.1 + 0.001 * i - 0.002, f"subscription {i} woke early"
    assert max(done_at) - t0 < 2.0
    assert clock.waiting() == 0 and clock._handle is None
    for s in subs:
        s.close()


async def test_a_closed_subscription_leaves_the_clock_at_once() -> None:
    clock = IdleClock()
    keep, gone = _subscription(clock), _subscription(clock)
    w1 = asyncio.create_task(keep.next_batch(0.2))
    w2 = asyncio.create_task(gone.next_batch(0.2))
    await asyncio.sleep(0.01)
    assert clock.waiting() == 2
    gone.close()
    assert clock.waiting() == 1
    assert await w2 == []  # closed cleanly
    assert await w1 is None  # the other still gets its heartbeat
    keep.close()


async def test_a_shorter_heartbeat_interval_is_not_held_up_by_a_longer_timer() -> None:
    sub = _subscription()
    waiting = asyncio.create_task(sub.next_batch(30.0))
    await asyncio.sleep(0.01)
    sub.push([_message(1)], float("inf"))
    await waiting
    t0 = time.monotonic()
    assert await sub.next_batch(0.1) is None
    assert time.monotonic() - t0 < 2.0
    sub.close()


async def test_batches_that_piled_up_go_out_coalesced_in_order_up_to_1000() -> None:
    sub = _subscription()
    seq = iter(range(1, 10_000))
    piled = [[_message(next(seq)) for _ in range(n)] for n in (400, 400, 400, 10)]
    for batch in piled:
        sub.push(batch, float("inf"))
    first = await sub.next_batch(1.0)  # coalescing stops once a batch holds 1000 or more
    assert first == piled[0] + piled[1] + piled[2]
    assert await sub.next_batch(1.0) == piled[3]
    sub.close()
    assert await sub.next_batch(1.0) == []  # closed cleanly, nothing left
