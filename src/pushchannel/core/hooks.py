"""Hooks: how metrics, logs and counters observe the broker without living in it.

The core calls one method of :class:`BrokerHooks` per event, once per batch, on the event
loop; the default implementation does nothing. :class:`HookChain` fans an event out to several
hooks in order. A hook must be cheap and must not raise: it runs inside publish and dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pushchannel.core.model import Stored
    from pushchannel.core.subscription import Subscription

__all__ = ["BrokerHooks", "HookChain"]


class BrokerHooks:
    """Subclass and override what you need; every method is a no-op here."""

    __slots__ = ()

    def on_publish(self, channel: str, stored: int, duplicates: int, seconds: float) -> None:
        """A publish call stored ``stored`` new messages (and found ``duplicates``) in ``seconds``."""

    def on_deliver(self, channel: str, group: str, messages: Sequence[Stored], now: float) -> None:
        """``messages`` were handed to a subscription of ``group`` at ``now`` (unix s)."""

    def on_ack(self, channel: str, group: str, n: int) -> None:
        """A subscription settled ``n`` deliveries by ack."""

    def on_nack(self, channel: str, group: str, n: int) -> None:
        """A subscription gave ``n`` deliveries back."""

    def on_redeliver(self, channel: str, group: str, n: int) -> None:
        """``n`` messages were claimed again after a deadline, a nack or a broken stream."""

    def on_dead_letter(self, channel: str, group: str, n: int) -> None:
        """``n`` messages ran out of attempts and moved to the dead-letter channel."""

    def on_expired(self, channel: str, n: int) -> None:
        """``n`` messages outlived their ttl before delivery and were dropped."""

    def on_subscribe(self, sub: Subscription) -> None:
        """A subscription opened (it is registered with its dispatcher)."""

    def on_unsubscribe(self, sub: Subscription) -> None:
        """A subscription ended; ``sub.error`` says why when the broker ended it."""

    def on_error(self, where: str, channel: str, exc: BaseException) -> None:
        """A background task (dispatch, retention, ...) failed and will retry."""


def _overrides(hooks: Sequence[BrokerHooks], event: str) -> tuple[Callable[..., None], ...]:
    """The bound ``event`` methods of the hooks that do something on it."""
    base = getattr(BrokerHooks, event)
    return tuple(getattr(h, event) for h in hooks if getattr(type(h), event) is not base)


class HookChain(BrokerHooks):
    """Calls each hook in turn; a hook that does not override an event is not called for it
    (the per-message events run on every publish, delivery and ack)."""

    __slots__ = (
        "_ack",
        "_dead_letter",
        "_deliver",
        "_error",
        "_expired",
        "_nack",
        "_publish",
        "_redeliver",
        "_subscribe",
        "_unsubscribe",
        "hooks",
    )

    def __init__(self, *hooks: BrokerHooks) -> None:
        self.hooks: tuple[BrokerHooks, ...] = hooks
        self._publish = _overrides(hooks, "on_publish")
        self._deliver = _overrides(hooks, "on_deliver")
        self._ack = _overrides(hooks, "on_ack")
        self._nack = _overrides(hooks, "on_nack")
        self._redeliver = _overrides(hooks, "on_redeliver")
        self._dead_letter = _overrides(hooks, "on_dead_letter")
        self._expired = _overrides(hooks, "on_expired")
        self._subscribe = _overrides(hooks, "on_subscribe")
        self._unsubscribe = _overrides(hooks, "on_unsubscribe")
        self._error = _overrides(hooks, "on_error")

    def on_publish(self, channel: str, stored: int, duplicates: int, seconds: float) -> None:
        for f in self._publish:
            f(channel, stored, duplicates, seconds)

    def on_deliver(self, channel: str, group: str, messages: Sequence[Stored], now: float) -> None:
        for f in self._deliver:
            f(channel, group, messages, now)

    def on_ack(self, channel: str, group: str, n: int) -> None:
        for f in self._ack:
            f(channel, group, n)

    def on_nack(self, channel: str, group: str, n: int) -> None:
        for f in self._nack:
            f(channel, group, n)

    def on_redeliver(self, channel: str, group: str, n: int) -> None:
        for f in self._redeliver:
            f(channel, group, n)

    def on_dead_letter(self, channel: str, group: str, n: int) -> None:
        for f in self._dead_letter:
            f(channel, group, n)

    def on_expired(self, channel: str, n: int) -> None:
        for f in self._expired:
            f(channel, n)

    def on_subscribe(self, sub: Subscription) -> None:
        for f in self._subscribe:
            f(sub)

    def on_unsubscribe(self, sub: Subscription) -> None:
        for f in self._unsubscribe:
            f(sub)

    def on_error(self, where: str, channel: str, exc: BaseException) -> None:
        for f in self._error:
            f(where, channel, exc)
