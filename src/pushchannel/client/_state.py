"""The reconnect state machine of a long-lived stream: a status enum, its changes, listeners.

::

    IDLE ──► CONNECTING ──► READY
                ▲  │          │
                │  ▼          ▼
              RECONNECTING ◄──┘        (any state) ──► CLOSED

:class:`Reconnector` does no I/O: the subscription (or seed stream) that owns it reports what
happened (``connecting()``, ``ready()``, ``failed(error)``, ``closed()``) and gets back how long
to wait. It tells listeners and the log about every change.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random as _random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from pushchannel.client._backoff import Backoff, Clock, Random
from pushchannel.client._types import RetryPolicy
from pushchannel.errors import PushChannelError

log = logging.getLogger("pushchannel.client")


class ConnectionState(enum.Enum):
    """Where a subscription's stream is."""

    IDLE = "idle"
    """Not opened yet."""
    CONNECTING = "connecting"
    """A stream is being opened (the first time, or again after a failure)."""
    READY = "ready"
    """The broker answered ``Opened``: messages flow."""
    RECONNECTING = "reconnecting"
    """The stream failed with a transient fault; waiting ``delay`` seconds before the next try."""
    CLOSED = "closed"
    """For good: closed by the application, or a fault that cannot be retried (``error``)."""


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change of a :class:`ConnectionState`.

    ``subject`` names the stream (e.g. ``"subscribe hosts.berlin-1 group default"``).
    ``attempt`` counts the consecutive failures so far (0 once ready). ``delay`` is set on
    ``RECONNECTING``: the seconds until the next attempt. ``error`` is why the stream failed
    (``RECONNECTING``) or ended (``CLOSED``; ``None`` when the application closed it).
    ``time`` is :func:`time.time` at the change.
    """

    subject: str
    state: ConnectionState
    previous: ConnectionState
    attempt: int = 0
    delay: float | None = None
    error: PushChannelError | None = None
    time: float = 0.0

    def describe(self) -> str:
        """The change as a log line."""
        text = f"{self.subject}: {self.state.value}"
        if self.state is ConnectionState.RECONNECTING:
            text += f" in {self.delay or 0:.2f} s (attempt {self.attempt})"
        elif self.state is ConnectionState.CONNECTING and self.attempt:
            text += f" (attempt {self.attempt + 1})"
        if self.error is not None:
            text += f" after {self.error.code}: {self.error}"
        return text


StateListener = Callable[[StateChange], None]
"""Called with every :class:`StateChange`, on the event loop that runs the stream."""

_S = ConnectionState
_ALLOWED: dict[ConnectionState, frozenset[ConnectionState]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.READY, _S.RECONNECTING, _S.CLOSED}),
    _S.READY: frozenset({_S.RECONNECTING, _S.CLOSED}),
    _S.RECONNECTING: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class Reconnector:
    """The state of one reconnecting stream and the backoff between its attempts."""

    def __init__(
        self,
        subject: str,
        policy: RetryPolicy,
        *,
        listeners: Iterable[StateListener] = (),
        random: Random = _random.random,
        clock: Clock = time.monotonic,
    ) -> None:
        self.subject = subject
        self._backoff = Backoff(policy, random=random, clock=clock)
        self._state = ConnectionState.IDLE
        self._listeners: list[StateListener] = list(listeners)
        self._queues: list[asyncio.Queue[StateChange]] = []

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def attempt(self) -> int:
        """Consecutive failures so far."""
        return self._backoff.attempt

    def add_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener`` on every change from now on; returns a function that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def changes(self) -> AsyncIterator[StateChange]:
        """The changes from now on, ending after ``CLOSED`` (at once if closed already)."""
        if self._state is ConnectionState.CLOSED:
            return
        queue: asyncio.Queue[StateChange] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                change = await queue.get()
                yield change
                if change.state is ConnectionState.CLOSED:
                    return
        finally:
            self._queues.remove(queue)

    # -- what the stream's owner reports ---------------------------------------------------------
    def connecting(self) -> None:
        """An attempt to open the stream starts."""
        self._move(ConnectionState.CONNECTING)

    def ready(self) -> None:
        """The stream is open: the backoff starts over."""
        self._backoff.reset()
        self._move(ConnectionState.READY)

    def failed(self, error: PushChannelError) -> float | None:
        """The stream failed with a transient fault: how long to wait before the next
        attempt, or ``None`` when the policy's deadline has passed (then call :meth:`closed`)."""
        delay = self._backoff.next_delay()
        if delay is not None:
            self._move(ConnectionState.RECONNECTING, delay=delay, error=error)
        return delay

    def closed(self, error: PushChannelError | None = None) -> None:
        """For good (idempotent)."""
        if self._state is not ConnectionState.CLOSED:
            self._move(ConnectionState.CLOSED, error=error)

    def _move(
        self, state: ConnectionState, *, delay: float | None = None, error: PushChannelError | None = None
    ) -> None:
        previous = self._state
        if state not in _ALLOWED[previous]:
            raise RuntimeError(f"{self.subject}: no transition from {previous.value} to {state.value}")
        self._state = state
        change = StateChange(self.subject, state, previous, self._backoff.attempt, delay, error, time.time())
        level = logging.WARNING if state is ConnectionState.RECONNECTING else logging.INFO
        if state is ConnectionState.CLOSED and error is not None:
            level = logging.ERROR
        log.log(level, "%s", change.describe())
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                # A listener's bug must not break the stream it watches.
                log.exception("%s: a state listener failed", self.subject)
        for queue in self._queues:
            queue.put_nowait(change)
