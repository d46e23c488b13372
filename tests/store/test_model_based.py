"""Random sequences of store calls, checked step by step against a pure-Python reference model.

The model is the store contract in its simplest form: a dict log, a cursor and a pending dict per
group, a dedupe dict. Where the contract leaves a choice open, the check accepts every allowed
answer and the model then adopts what the store did:

- which due entries ``claim_expired`` takes when more are due than ``limit`` (any of them);
- when a pending entry whose message was trimmed leaves the pending list (any time from the
  trim to the claim that finds it gone; ``ack`` counts it only while it is still listed);
- whether such a stale entry still holds back interest trimming.

Each example gets a fresh store (file stores: in a fresh temporary directory) driven on a
private event loop, so the test itself is synchronous and independent of pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pushchannel.core.model import DEFAULT_GROUP, ChannelPolicy, NewMessage, StartSpec, Stored
from pushchannel.store.base import Store

from .conftest import STORE_FACTORIES, build_store

T = TypeVar("T")

CH = "model.channel"
T0 = 1_000_000.0
EXPIRED_REASON = "ack deadline exceeded"
GROUPS = (DEFAULT_GROUP, "second")
#: Raise for a longer hunt, e.g. PUSHCHANNEL_MODEL_EXAMPLES=2000.
MAX_EXAMPLES = int(os.environ.get("PUSHCHANNEL_MODEL_EXAMPLES", "100"))
CONSUMERS = ("c1", "c2")
# Time moves in whole seconds; windows and ages end on half seconds, so no step lands exactly on
# a boundary the contract leaves open (deadlines are "at or before now": integers are fine).
POLICY = ChannelPolicy(max_age=40.5, max_messages=6, dedupe_window=10.5, discard="drop-oldest")

ids = st.sampled_from(["", "", "", "a", "b", "c", "d"])
groups = st.sampled_from(GROUPS)
consumers = st.sampled_from(CONSUMERS)
limits = st.integers(1, 4)
leases = st.sampled_from([0, 0, 1, 2, 5, 10, 20])
steps = st.sampled_from([0, 1, 3, 10, 25])


@dataclass
class Msg:
    seq: int
    id: str
    payload: bytes
    publish_time: float


@dataclass
class Entry:
    consumer: str
    deadline: float
    attempt: int
    reason: str = ""


@dataclass
class Group:
    cursor: int
    pending: dict[int, Entry]


class Model:
    def __init__(self) -> None:
        self.log: dict[int, Msg] = {}
        self.last_seq = 0
        self.dedupe: dict[str, tuple[int, float]] = {}
        self.groups = {name: Group(0, {}) for name in GROUPS}

    def live(self, seq: int) -> bool:
        return seq in self.log

    def first_seq(self) -> int:
        return min(self.log, default=self.last_seq + 1)

    def drop_below(self, seq: int) -> int:
        gone = [s for s in self.log if s < seq]
        for s in gone:
            del self.log[s]
        return len(gone)

    def append(self, batch: Sequence[tuple[str, bytes]], now: float) -> list[tuple[int, bool]]:
        results: list[tuple[int, bool]] = []
        seen: dict[str, int] = {}
        fresh: list[Msg] = []
        for id_, payload in batch:
            if id_:
                hit = self.dedupe.get(id_)
                if hit is not None and now - hit[1] < POLICY.dedupe_window:
                    results.append((hit[0], True))
                    continue
                if id_ in seen:
                    results.append((seen[id_], True))
                    continue
            self.last_seq += 1
            if id_:
                seen[id_] = self.last_seq
            fresh.append(Msg(self.last_seq, id_, payload, now))
            results.append((self.last_seq, False))
        for m in fresh:
            self.log[m.seq] = m
            if m.id:
                self.dedupe[m.id] = (m.seq, now)
        while len(self.log) > POLICY.max_messages:
            del self.log[min(self.log)]
        return results


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coro)


class StoreMachine(RuleBasedStateMachine):
    store_name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="pushchannel-model-")
        self.store: Store | None = None
        self.now = T0
        self.counter = 0
        self.model = Model()
        store = self.run(build_store(self.store_name, Path(self.dir)))
        self.run(store.start())
        self.store = store
        self.run(store.ensure_channel(CH, POLICY, self.now))
        self.run(store.ensure_group(CH, "second", StartSpec("earliest"), self.now))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return run_on(self.loop, coro)

    @property
    def s(self) -> Store:
        assert self.store is not None
        return self.store

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------
    def check_delivery(self, m: Stored, attempt: int, reason: str) -> None:
        ref = self.model.log[m.seq]
        assert (m.id, m.payload, m.publish_time, m.expires_at) == (ref.id, ref.payload, ref.publish_time, 0.0)
        assert (m.attempt, m.reason) == (attempt, reason)

    def sync_pending(self, group: str) -> None:
        """Check the store's pending list against the model; adopt its choice on stale entries."""
        g = self.model.groups[group]
        got = self.run(self.s.pending(CH, group, limit=10_000))
        assert [e.seq for e in got] == sorted(e.seq for e in got), "pending must be in seq order"
        listed = {e.seq: e for e in got}
        for seq, e in listed.items():
            assert seq in g.pending, f"{group}: seq {seq} pending in the store, not in the model"
            ref = g.pending[seq]
            assert (e.consumer, e.deadline, e.attempt) == (ref.consumer, ref.deadline, ref.attempt), (
                f"{group}: pending entry {seq}"
            )
        for seq in list(g.pending):
            if seq not in listed:
                assert not self.model.live(seq), f"{group}: seq {seq} lost from pending"
                del g.pending[seq]  # stale (message gone): the store dropped it, fine

    def unread(self) -> bool:
        return any(s > g.cursor for g in self.model.groups.values() for s in self.model.log)

    def any_pending(self) -> bool:
        return any(g.pending for g in self.model.groups.values())

    def busy_group(self, data: st.DataObject) -> str:
        """A group with pending entries (the rules that need them run only when there are some)."""
        busy = [name for name, g in self.model.groups.items() if g.pending] or list(GROUPS)
        return data.draw(st.sampled_from(busy), label="group")

    def pick_seqs(self, data: st.DataObject, group: str) -> list[int]:
        pending = sorted(self.model.groups[group].pending)
        other = [0, self.model.last_seq + 1, self.model.last_seq + 5]
        return data.draw(st.lists(st.sampled_from(pending + other), max_size=5), label="seqs")

    # -- rules ---------------------------------------------------------------------------------
    @initialize(batch=st.lists(ids, max_size=8))
    def prefill(self, batch: list[str]) -> None:
        if batch:
            self.append(batch)

    @rule(batch=st.lists(ids, min_size=1, max_size=4))
    def append(self, batch: list[str]) -> None:
        items = []
        for id_ in batch:
            self.counter += 1
            items.append((id_, f"p{self.counter}".encode()))
        got = self.run(self.s.append(CH, [NewMessage(p, id=i) for i, p in items], self.now, POLICY))
        expected = self.model.append(items, self.now)
        assert [(r.seq, r.duplicate) for r in got] == expected

    @precondition(lambda self: self.unread())
    @rule(group=groups, consumer=consumers, limit=limits, lease=leases)
    def read_new(self, group: str, consumer: str, limit: int, lease: int) -> None:
        g = self.model.groups[group]
        deadline = self.now + lease
        got = self.run(self.s.read_new(CH, group, consumer, limit, deadline))
        expected = sorted(s for s in self.model.log if s > g.cursor)[:limit]
        assert [m.seq for m in got] == expected
        for m in got:
            self.check_delivery(m, 1, "")
            g.pending[m.seq] = Entry(consumer, deadline, 1)
        if expected:
            g.cursor = expected[-1]

    @precondition(lambda self: self.any_pending())
    @rule(data=st.data(), consumer=consumers, limit=limits, lease=leases, dt=steps)
    def claim_expired(self, data: st.DataObject, consumer: str, limit: int, lease: int, dt: int) -> None:
        self.now += dt
        group = self.busy_group(data)
        g = self.model.groups[group]
        self.sync_pending(group)
        deadline = self.now + lease
        due = {s for s, e in g.pending.items() if e.deadline <= self.now}
        due_live = {s for s in due if self.model.live(s)}
        due_stale = due - due_live
        stale = len(due_stale)
        got = self.run(self.s.claim_expired(CH, group, consumer, limit, self.now, deadline))
        taken = [m.seq for m in got]
        assert len(set(taken)) == len(taken), f"claimed twice in one call: {taken}"
        assert set(taken) <= due_live, f"claimed {taken}, due and live: {sorted(due_live)}"
        most = min(limit, len(due_live))
        assert max(0, most - stale) <= len(taken) <= most, f"claimed {taken} of {sorted(due_live)}"
        for m in got:
            ref = g.pending[m.seq]
            self.check_delivery(m, ref.attempt + 1, ref.reason or EXPIRED_REASON)
            g.pending[m.seq] = Entry(consumer, deadline, ref.attempt + 1)
        self.sync_pending(group)
        # A claim that had room left found every due entry, so it dropped the stale ones.
        left = due_stale & set(g.pending)
        if len(taken) + stale - len(left) < limit:
            assert not left, f"claim kept the entries of trimmed messages {sorted(left)}"

    @precondition(lambda self: self.any_pending())
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        group = self.busy_group(data)
        self.sync_pending(group)
        g = self.model.groups[group]
        seqs = self.pick_seqs(data, group)
        n = self.run(self.s.ack(CH, group, seqs))
        assert n == len(set(seqs) & set(g.pending))
        for seq in seqs:
            g.pending.pop(seq, None)

    @precondition(lambda self: self.any_pending())
    @rule(data=st.data(), delay=st.sampled_from([0, 0, 1, 5]), reason=st.sampled_from(["boom", "x"]))
    def nack(self, data: st.DataObject, delay: int, reason: str) -> None:
        group = self.busy_group(data)
        self.sync_pending(group)
        g = self.model.groups[group]
        seqs = self.pick_seqs(data, group)
        n = self.run(self.s.nack(CH, group, seqs, self.now + delay, reason))
        hit = set(seqs) & set(g.pending)
        assert n == len(hit)
        for seq in hit:
            g.pending[seq].deadline = self.now + delay
            g.pending[seq].reason = reason

    @precondition(lambda self: self.any_pending())
    @rule(data=st.data(), lease=leases)
    def extend(self, data: st.DataObject, lease: int) -> None:
        group = self.busy_group(data)
        self.sync_pending(group)
        g = self.model.groups[group]
        seqs = self.pick_seqs(data, group)
        n = self.run(self.s.extend(CH, group, seqs, self.now + lease))
        hit = set(seqs) & set(g.pending)
        assert n == len(hit)
        for seq in hit:
            g.pending[seq].deadline = self.now + lease

    @rule(dt=steps)
    def advance(self, dt: int) -> None:
        self.now += dt

    @precondition(lambda self: self.model.last_seq > 0)
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        for group in GROUPS:
            self.sync_pending(group)
        model = self.model
        keep_from = data.draw(st.none() | st.integers(1, model.last_seq + 2), label="keep_from")
        # Interest: the lowest seq a group still needs; stale pending entries may or may not count.
        strict = lax = model.last_seq + 1
        for g in model.groups.values():
            live_pending = [s for s in g.pending if model.live(s)]
            strict = min(strict, g.cursor + 1, *live_pending)
            lax = min(lax, g.cursor + 1, *g.pending)
        if keep_from is not None:
            strict, lax = min(strict, keep_from), min(lax, keep_from)
        # Age: a prefix, since publish times grow with seqs.
        young = [s for s, m in model.log.items() if m.publish_time >= self.now - POLICY.max_age]
        aged_floor = min(young, default=model.last_seq + 1)
        low, high = max(lax, aged_floor), max(strict, aged_floor)

        report = self.run(self.s.trim(CH, POLICY, self.now, keep_from))
        first = min((m.seq for m in self.run(self.s.read_range(CH, 0, 1))), default=model.last_seq + 1)
        must_go = [s for s in model.log if s < low]
        must_stay = [s for s in model.log if s >= high]
        assert all(s < first for s in must_go), f"trim kept {must_go} (log starts at {first})"
        assert all(s >= first for s in must_stay), f"trim removed some of {must_stay} (log starts at {first})"
        removed = model.drop_below(first)
        assert report.total == removed
        assert report.dropped == 0 and report.expired == 0

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        if self.store is None:
            return
        model = self.model
        assert self.run(self.s.last_seq(CH)) == model.last_seq
        got = self.run(self.s.read_range(CH, 0, 10_000))
        assert [m.seq for m in got] == sorted(model.log)
        for m in got:
            self.check_delivery(m, 1, "")
        stats = self.run(self.s.stats(CH))
        assert stats is not None
        assert (stats.depth, stats.last_seq) == (len(model.log), model.last_seq)
        if model.log:
            assert stats.first_seq == model.first_seq()
            assert stats.oldest_publish_time == model.log[model.first_seq()].publish_time
        for group in GROUPS:
            self.sync_pending(group)
        by_name = {g.name: g for g in stats.groups}
        assert sorted(by_name) == sorted(GROUPS)
        for name, g in model.groups.items():
            gs = by_name[name]
            assert gs.cursor == g.cursor, name
            assert gs.lag == model.last_seq - g.cursor, name
            assert gs.pending == len(g.pending), name
            deadlines = [e.deadline for e in g.pending.values()]
            assert self.run(self.s.next_deadline(CH, name)) == min(deadlines, default=None), name


@pytest.mark.parametrize("store_name", list(STORE_FACTORIES))
def test_store_matches_the_model(store_name: str) -> None:
    machine = type(f"StoreMachine_{store_name}", (StoreMachine,), {"store_name": store_name})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
