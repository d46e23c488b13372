"""The store interface: Redis Streams' consumer-group model as a small async API.

A store keeps, per channel, an append-only log with sequence numbers 1, 2, 3, ..., a set of
durable groups (a cursor each, the last seq handed out) and each group's pending list (seqs
handed out and not acked, each with a consumer, a deadline, an attempt count and the reason
the previous attempt failed). Every call takes and returns batches. The conformance suite in
``tests/store`` is the definition of a store; logic that can be written once on top of the
primitives lives here, in :class:`Store`.

Times are unix seconds (floats) handed in by the caller, so stores never read the clock and
tests can drive time.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence

from pushchannel.core.model import (
    DEAD_LETTER_SUFFIX,
    DEFAULT_GROUP,
    AppendResult,
    ChannelPolicy,
    ChannelStats,
    NewMessage,
    PendingEntry,
    StartSpec,
    Stored,
    TrimReport,
)


def start_cursor(
    start: StartSpec, group: str, first_seq: int, last_seq: int, first_at: Callable[[float], int]
) -> int:
    """Where a new group's cursor starts (the last seq it will not get), for every store:
    ``first_at(t)`` answers the first live seq published at or after ``t`` (last_seq + 1: none)."""
    kind = start.kind
    if kind == "default":
        kind = "earliest" if group == DEFAULT_GROUP else "new"
    if kind == "new":
        return last_seq
    if kind == "earliest":
        return first_seq - 1
    if kind == "seq":
        return max(0, int(start.value) - 1)
    return first_at(start.value) - 1


class Store(abc.ABC):
    """One store; several brokers may share it when ``shared`` is true."""

    #: True when other processes may append to the same channels (Redis): the broker then
    #: watches channels with :meth:`wait` instead of relying on its own publishes alone.
    shared: bool = False
    #: Seconds between sweeps for expired deliveries that no local timer knows of (set by
    #: shared stores, whose other nodes hand out deliveries too); None: no sweep needed.
    sweep_interval: float | None = None
    #: True when no call ever suspends (in process, no I/O: the memory store). A publish then
    #: runs the dispatch round itself rather than starting a task for it: the round is a few
    #: microseconds of CPU, while a store with I/O would make the publisher wait for a read.
    immediate: bool = False

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open connections or files; raise Unavailable if the store cannot be used."""

    async def close(self) -> None:
        """Release everything; pending work is already stored."""

    # -- the log -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def ensure_channel(self, channel: str, policy: ChannelPolicy, now: float) -> bool:
        """Create the channel (with its ``default`` group when the policy wants one). True if new."""

    @abc.abstractmethod
    async def append(
        self, channel: str, messages: Sequence[NewMessage], now: float, policy: ChannelPolicy
    ) -> list[AppendResult]:
        """Append atomically, creating the channel. A message whose id was stored within
        ``policy.dedupe_window`` is not stored again: its result carries the first seq and
        ``duplicate=True``. On a full channel, drop the oldest (counted) or raise
        ResourceExhausted (policy ``reject``) without storing anything."""

    @abc.abstractmethod
    async def read_range(self, channel: str, after_seq: int, limit: int) -> list[Stored]:
        """Up to ``limit`` stored messages with seq > after_seq, in seq order."""

    @abc.abstractmethod
    async def last_seq(self, channel: str) -> int:
        """The highest seq ever given on the channel (0: none, or no such channel)."""

    # -- groups ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def ensure_group(self, channel: str, group: str, start: StartSpec, now: float) -> bool:
        """Create the group at ``start`` unless it exists (an existing group keeps its place)."""

    @abc.abstractmethod
    async def read_new(
        self, channel: str, group: str, consumer: str, limit: int, deadline: float
    ) -> list[Stored]:
        """Advance the group's cursor over up to ``limit`` messages and mark them pending for
        ``consumer`` until ``deadline`` (attempt 1)."""

    @abc.abstractmethod
    async def claim_expired(
        self, channel: str, group: str, consumer: str, limit: int, now: float, deadline: float
    ) -> list[Stored]:
        """Take over up to ``limit`` pending entries whose deadline is at or before ``now``:
        each comes back with ``attempt`` one higher and the ``reason`` of the failed attempt,
        now pending for ``consumer`` until ``deadline``. Entries whose message is gone
        (trimmed) are dropped from the pending list instead."""

    @abc.abstractmethod
    async def next_deadline(self, channel: str, group: str) -> float | None:
        """The earliest deadline in the group's pending list (None: nothing pending)."""

    @abc.abstractmethod
    async def ack(self, channel: str, group: str, seqs: Sequence[int]) -> int:
        """Remove seqs from the pending list; the number that were pending."""

    @abc.abstractmethod
    async def nack(
        self, channel: str, group: str, seqs: Sequence[int], visible_at: float, reason: str
    ) -> int:
        """Make pending seqs claimable from ``visible_at`` on, remembering why."""

    @abc.abstractmethod
    async def extend(self, channel: str, group: str, seqs: Sequence[int], deadline: float) -> int:
        """Move the deadline of pending seqs (ModifyDeadline, lease extension)."""

    @abc.abstractmethod
    async def pending(self, channel: str, group: str, limit: int = 1000) -> list[PendingEntry]:
        """The group's pending entries in seq order."""

    @abc.abstractmethod
    async def groups(self, channel: str) -> list[str]:
        """Names of the channel's durable groups."""

    @abc.abstractmethod
    async def delete_group(self, channel: str, group: str) -> bool:
        """Delete a group with its pending list. True if it existed."""

    # -- retention and admin -----------------------------------------------------------------
    @abc.abstractmethod
    async def trim(
        self, channel: str, policy: ChannelPolicy, now: float, keep_from: int | None = None
    ) -> TrimReport:
        """Remove what no durable group needs any more (below every group's cursor and pending
        list; nothing at or above ``keep_from``, which protects live broadcast cursors), and
        what the age limit says must go."""

    @abc.abstractmethod
    async def channels(self) -> list[str]:
        """Every channel's name, sorted."""

    @abc.abstractmethod
    async def stats(self, channel: str) -> ChannelStats | None:
        """Depth, bytes and groups of a channel; None when it does not exist."""

    @abc.abstractmethod
    async def purge(self, channel: str) -> int:
        """Remove every stored message (groups stay, their pending lists are emptied)."""

    @abc.abstractmethod
    async def delete(self, channel: str) -> bool:
        """Remove the channel with its groups. True if it existed."""

    # -- shared logic ------------------------------------------------------------------------
    async def dead_letter(
        self, channel: str, group: str, messages: Sequence[Stored], now: float, policy: ChannelPolicy
    ) -> None:
        """Move messages that ran out of attempts to ``<channel>.dead-letter``, with attributes
        naming their origin, then ack them in their group. Stores that can do both in one
        transaction override this; here a crash in between leaves a copy in both places,
        never in neither."""
        if not messages:
            return
        moved = [
            NewMessage(
                payload=m.payload,
                attributes={
                    **m.attributes,
                    "pushchannel.origin_channel": channel,
                    "pushchannel.origin_group": group,
                    "pushchannel.origin_seq": str(m.seq),
                    "pushchannel.attempts": str(m.attempt - 1),
                    "pushchannel.reason": m.reason,
                },
            )
            for m in messages
        ]
        await self.append(channel + DEAD_LETTER_SUFFIX, moved, now, policy)
        await self.ack(channel, group, [m.seq for m in messages])

    async def wait(self, channel: str, after_seq: int, timeout: float) -> int:
        """Return once the channel's last seq is beyond ``after_seq`` (or after ``timeout``);
        the last seq. In-process stores are woken by their own appends; shared stores
        override this with a blocking read."""
        last = await self.last_seq(channel)
        if last > after_seq:
            return last
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[channel]
        return await self.last_seq(channel)

    def _wake(self, channel: str) -> None:
        """Called by in-process stores after an append commits."""
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_result(None)
