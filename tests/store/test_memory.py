"""The memory store's own bookkeeping: what an idle channel keeps (the conformance suite covers
what every store answers)."""

from __future__ import annotations

from pushchannel.core.model import AppendResult, ChannelPolicy, NewMessage
from pushchannel.store.memory import MemoryStore

T0 = 1_700_000_000.0


async def test_an_idle_channel_lets_go_of_its_dedupe_window() -> None:
    store = MemoryStore()
    await store.start()
    policy = ChannelPolicy(dedupe_window=10.0)
    batch = [NewMessage(payload=b"x", id=f"id-{i}") for i in range(1000)]
    await store.append("c", batch, T0, policy)
    ch = store._channels["c"]
    assert ch.dedupe_order is not None and len(ch.dedupe) == 1000
    # the window passes; the next append (here without an id) prunes every entry
    assert await store.append("c", [NewMessage(payload=b"y")], T0 + 11, policy) == [AppendResult(1001, False)]
    assert ch.dedupe_order is None and ch.dedupe == {}
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
    assert store._channels["c"].dedupe_order is None
    await store.close()
