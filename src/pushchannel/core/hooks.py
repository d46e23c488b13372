"""Hooks: how metrics, logs and counters observe the broker without living in it.

The core calls one method of :class:`BrokerHooks` per event, once per batch, on the event
loop; the default implementation does nothing. :class:`HookChain` fans an event out to several
hooks in order. A hook must be cheap and must not raise: it runs inside publish and dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class HookChain(BrokerHooks):
    """Calls each hook in turn."""

    __slots__ = ("hooks",)

    def __init__(self, *hooks: BrokerHooks) -> None:
        self.hooks: tuple[BrokerHooks, ...] = hooks

    def on_publish(self, channel: str, stored: int, duplicates: int, seconds: float) -> None:
        for h in self.hooks:
            h.on_publish(channel, stored, duplicates, seconds)

    def on_deliver(self, channel: str, group: str, messages: Sequence[Stored], now: float) -> None:
        for h in self.hooks:
            h.on_deliver(channel, group, messages, now)

    def on_ack(self, channel: str, group: str, n: int) -> None:
        for h in self.hooks:
            h.on_ack(channel, group, n)

    def on_nack(self, channel: str, group: str, n: int) -> None:
        for h in self.hooks:
            h.on_nack(channel, group, n)

    def on_redeliver(self, channel: str, group: str, n: int) -> None:
        for h in self.hooks:
            h.on_redeliver(channel, group, n)

    def on_dead_letter(self, channel: str, group: str, n: int) -> None:
        for h in self.hooks:
            h.on_dead_letter(channel, group, n)

    def on_expired(self, channel: str, n: int) -> None:
        for h in self.hooks:
            h.on_expired(channel, n)

    def on_subscribe(self, sub: Subscription) -> None:
        for h in self.hooks:
            h.on_subscribe(sub)

    def on_unsubscribe(self, sub: Subscription) -> None:
        for h in self.hooks:
            h.on_unsubscribe(sub)

    def on_error(self, where: str, channel: str, exc: BaseException) -> None:
        for h in self.hooks:
            h.on_error(where, channel, exc)
