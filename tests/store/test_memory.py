"""The memory store's own bookkeeping: what an idle channel keeps (the conformance suite covers
what every store answers)."""

from __future__ import annotations

import sys

from pushchannel.core.model import AppendResult, ChannelPolicy, NewMessage, StartSpec
from pushchannel.store.memory import MemoryStore

T0 = 1_700_000_000.0


async def test_an_idle_channel_lets_go_of_its_dedupe_window() -> None:
    store = MemoryStore()
    await store.start()
    policy = ChannelPolicy(dedupe_window=10.0)
    batch = [NewMessage(payload=b"x", id=f"id-{i}") for i in range(1000)]
    await store.append("c", batch, T0, policy)
    ch = store._channels["c"]
    assert ch.dedupe_ids is not None and ch.dedupe_times is not None and len(ch.dedupe) == 1000
    assert len(ch.dedupe_ids) == len(ch.dedupe_times) == 1000
    # the window passes; the next append (here without an id) prunes every entry
    assert await store.append("c", [NewMessage(payload=b"y")], T0 + 11, policy) == [AppendResult(1001, False)]
    assert ch.dedupe_ids is None and ch.dedupe_times is None and ch.dedupe == {}
    # ...and a retry of an old id after the window is a new message, a fresh one still dedupes
    assert await store.append("c", [NewMessage(payload=b"x", id="id-3")], T0 + 12, policy) == [
        AppendResult(1002, False)
    ]
    assert await store.append("c", [NewMessage(payload=b"x", id="id-3")], T0 + 13, policy) == [
        AppendResult(1002, True)
    ]
    await store.close()


async def test_a_channel_that_never_saw_an_id_keeps_no_dedupe_queue() -> None:
    store = MemoryStore()
    await store.start()
    await store.append("c", [NewMessage(payload=b"x")], T0, ChannelPolicy())
    assert store._channels["c"].dedupe_ids is None and store._channels["c"].dedupe_times is None
    await store.close()


async def test_ids_leave_the_window_oldest_first_each_at_its_own_time() -> None:
    store = MemoryStore()
    await store.start()
    policy = ChannelPolicy(dedupe_window=10.0)
    for i, at in enumerate((0, 0, 4, 8)):  # a, b together; then c; then d
        await store.append("c", [NewMessage(payload=b"x", id="abcd"[i])], T0 + at, policy)
    ch = store._channels["c"]

    async def dupes(at: float) -> list[bool]:
        answers = await store.append("c", [NewMessage(payload=b"x", id=k) for k in "abcd"], T0 + at, policy)
        return [r.duplicate for r in answers]

    assert await dupes(9) == [True, True, True, True]
    assert ch.dedupe == {"a": 1, "b": 2, "c": 3, "d": 4}
    # at 10 the window has passed a and b (published again: a new seq each, remembered anew)
    assert await dupes(10) == [False, False, True, True]
    assert ch.dedupe == {"c": 3, "d": 4, "a": 5, "b": 6}
    assert list(ch.dedupe_ids or ()) == ["c", "d", "a", "b"]
    assert list(ch.dedupe_times or ()) == [T0 + 4, T0 + 8, T0 + 10, T0 + 10]
    assert await dupes(14) == [True, True, False, True]  # c (seen at 4) has gone: 7
    assert await store.append("c", [NewMessage(payload=b"x", id="c")], T0 + 15, policy) == [
        AppendResult(7, True)
    ]
    await store.close()


async def test_acked_and_trimmed_messages_are_let_go_of_at_once() -> None:
    """A channel that sees a message now and then never builds up a backlog of dropped ones: the
    store stops referring to a payload as soon as it is trimmed, long before the list of a busy
    channel would be compacted."""
    store = MemoryStore()
    await store.start()
    policy = ChannelPolicy()
    await store.ensure_group("c", "g", StartSpec("earliest"), T0)
    held_before = []
    for i in range(3):  # a message a while, each acked and trimmed before the next
        payload = bytes(f"payload-{i}", "ascii") * 1000  # a bytes object of its own
        base = sys.getrefcount(payload)
        (result,) = await store.append("c", [NewMessage(payload=payload)], T0 + i, policy)
        held_before.append(sys.getrefcount(payload) - base)
        (got,) = await store.read_new("c", "g", "consumer", 10, T0 + i + 30)
        assert got.payload is payload
        del got
        assert await store.ack("c", "g", [result.seq]) == 1
        report = await store.trim("c", policy, T0 + i)
        assert report.acked == 1
        assert sys.getrefcount(payload) == base, f"message {i} still held after its trim"
    assert held_before == [1, 1, 1]  # the store did hold each one until then
    # a backlog behind a slow group: trimming the front lets go of the front only
    payloads = [bytes(f"m-{i}", "ascii") * 1000 for i in range(10)]
    bases = [sys.getrefcount(payloads[i]) for i in range(10)]
    results = await store.append("c", [NewMessage(payload=p) for p in payloads], T0 + 10, policy)
    delivered = await store.read_new("c", "g", "consumer", 3, T0 + 40)
    assert await store.ack("c", "g", [m.seq for m in delivered]) == 3
    del delivered
    assert (await store.trim("c", policy, T0 + 10)).acked == 3
    held = [sys.getrefcount(payloads[i]) - bases[i] for i in range(10)]
    assert held == [0, 0, 0] + [1] * 7
    assert [m.payload for m in await store.read_range("c", 0, 100)] == payloads[3:]
    assert results[3].seq == (await store.stats("c")).first_seq  # type: ignore[union-attr]
    await store.close()
