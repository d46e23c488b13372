"""What a subscriber sends back on its stream: acks and nacks in batches, and lease extensions.

:class:`AckBatcher` collects settlements from any thread and writes one request per kind per
event-loop turn. :class:`Leases` is the I/O-free bookkeeping of the deadlines of deliveries
the application still holds, which the stream extends with ``ModifyDeadline`` in batches, as
Cloud Pub/Sub's client does, so a long task never makes the broker deliver it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

# Deadlines are checked six times per ack deadline and extended once half of it has passed, so
# an extension is sent between 1/2 and 2/3 of the way, with a third of the deadline to spare.
_CHECKS_PER_DEADLINE = 6
_EXTEND_AFTER = 0.5
_MIN_PERIOD = 0.02


class AckBatcher:
    """Collects acks and nacks from any thread and sends them as one request per kind once
    per event-loop turn, instead of one request per message. ``on_flush`` is told (on the
    loop) which tags were settled. Once :meth:`close` ran, settlements are dropped: the
    stream that carried those deliveries is gone and the broker delivers them again."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[pb.SubscribeRequest], None],
        on_flush: Callable[[list[int]], None] | None = None,
    ) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._send = send
        self._on_flush = on_flush
        self._lock = threading.Lock()
        self._acks: list[int] = []
        self._nacks: dict[tuple[int, str], list[int]] = {}
        self._scheduled = False
        self.closed = False

    def ack(self, tag: int) -> None:
        with self._lock:
            if self.closed:
                return
            self._acks.append(tag)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()

    def nack(self, tag: int, delay: float, reason: str) -> None:
        with self._lock:
            if self.closed:
                return
            self._nacks.setdefault((round(delay * 1000), reason), []).append(tag)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()

    def _schedule(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self.flush)
        else:
            # The loop may be gone already: then so is the stream, and the ack is moot.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.flush)

    def flush(self, *, final: bool = False) -> None:
        """Send what is pending; runs on the event loop. ``final``: drop whatever comes later."""
        with self._lock:
            if self.closed:
                return
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, {}
            self._scheduled = False
            self.closed = final
        if acks:
            self._send(pb.SubscribeRequest(ack=pb.Ack(delivery_tags=acks)))
        for (delay_ms, reason), tags in nacks.items():
            self._send(
                pb.SubscribeRequest(nack=pb.Nack(delivery_tags=tags, delay_ms=delay_ms, reason=reason))
            )
        if self._on_flush is not None:
            if acks:
                self._on_flush(acks)
            for tags in nacks.values():
                self._on_flush(tags)

    def close(self) -> None:
        """Send what is pending, then drop everything that comes later."""
        self.flush(final=True)


class Leases:
    """The deliveries a stream holds unsettled: when each arrived and when its deadline was
    last set, in seconds on one clock that the caller passes in.

    :meth:`due` returns the deliveries past half their ``ack_deadline``, grouped by the new
    deadline to ask for: another ``ack_deadline``, capped so that no lease runs past
    ``max_lease`` after its arrival. A delivery held longer than ``max_lease`` is let go: it is
    no longer extended, and the broker delivers it again once its deadline passes.
    """

    __slots__ = ("_held", "ack_deadline", "max_lease")

    def __init__(self, ack_deadline: float, max_lease: float) -> None:
        if ack_deadline <= 0 or max_lease <= 0:
            raise ValueError("ack_deadline and max_lease must be positive")
        self.ack_deadline = ack_deadline
        self.max_lease = max_lease
        self._held: dict[int, tuple[float, float]] = {}  # tag -> (arrived, deadline set)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def period(self) -> float:
        """How often to call :meth:`due`."""
        return max(_MIN_PERIOD, self.ack_deadline / _CHECKS_PER_DEADLINE)

    def add(self, tags: Iterable[int], now: float) -> None:
        held = self._held
        for tag in tags:
            held[tag] = (now, now)

    def discard(self, tags: Iterable[int]) -> None:
        held = self._held
        for tag in tags:
            held.pop(tag, None)

    def due(self, now: float) -> dict[int, list[int]]:
        """Deadline (ms from now) -> the tags to extend to it; marks them extended."""
        threshold = self.ack_deadline * _EXTEND_AFTER
        out: dict[int, list[int]] = {}
        let_go: list[int] = []
        held = self._held
        for tag, (arrived, deadline_set) in held.items():
            if now - deadline_set < threshold:
                continue
            ms = round(min(self.ack_deadline, arrived + self.max_lease - now) * 1000)
            if ms < 1:
                let_go.append(tag)
                continue
            out.setdefault(ms, []).append(tag)
            held[tag] = (arrived, now)
        for tag in let_go:
            del held[tag]
        return out


def extension_requests(due: dict[int, list[int]], max_tags: int = 10_000) -> list[pb.SubscribeRequest]:
    """``ModifyDeadline`` requests for :meth:`Leases.due`'s answer, at most ``max_tags`` each."""
    requests = []
    for ms, tags in due.items():
        for i in range(0, len(tags), max_tags):
            chunk = tags[i : i + max_tags]
            requests.append(
                pb.SubscribeRequest(modify_deadline=pb.ModifyDeadline(delivery_tags=chunk, deadline_ms=ms))
            )
    return requests
