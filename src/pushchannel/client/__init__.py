"""The pushchannel SDK: :class:`AsyncClient` for asyncio and :class:`Client`, its blocking face.

Both reconnect by themselves: publishes that go unanswered are retried with the same message
ids, and subscriptions are reopened in the same group, with exponential backoff and full
jitter (:class:`RetryPolicy`). A subscription's :class:`ConnectionState` and its changes
(:class:`StateChange`) are visible through callbacks and an async iterator.
:func:`seed_stream` and :func:`blocking_seed_stream` give the seed's ``PushMessageStream``
loop the same behaviour.
"""

import logging

from pushchannel.client._async import AsyncClient
from pushchannel.client._backoff import Backoff, backoff_ceiling
from pushchannel.client._blocking import BlockingSeedStream, BlockingSubscription
from pushchannel.client._seed import SeedStream, seed_stream
from pushchannel.client._state import ConnectionState, Reconnector, StateChange, StateListener
from pushchannel.client._subscription import Subscription
from pushchannel.client._sync import Client, blocking_seed_stream
from pushchannel.client._types import Message, OutgoingMessage, PublishResult, RetryPolicy

# The library convention: our log lines go where the application's logging config sends them,
# and nowhere (not to stderr via logging's last resort) when it has none.
logging.getLogger("pushchannel.client").addHandler(logging.NullHandler())

__all__ = [
    "AsyncClient",
    "Backoff",
    "BlockingSeedStream",
    "BlockingSubscription",
    "Client",
    "ConnectionState",
    "Message",
    "OutgoingMessage",
    "PublishResult",
    "Reconnector",
    "RetryPolicy",
    "SeedStream",
    "StateChange",
    "StateListener",
    "Subscription",
    "backoff_ceiling",
    "blocking_seed_stream",
    "seed_stream",
]
