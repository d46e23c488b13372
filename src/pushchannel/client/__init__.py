"""The pushchannel SDK: :class:`AsyncClient` for asyncio and :class:`Client`, its blocking face."""

from pushchannel.client._async import AsyncClient
from pushchannel.client._subscriber import Subscription
from pushchannel.client._sync import BlockingSubscription, Client
from pushchannel.client._types import Message, OutgoingMessage, PublishResult, RetryPolicy

__all__ = [
    "AsyncClient",
    "BlockingSubscription",
    "Client",
    "Message",
    "OutgoingMessage",
    "PublishResult",
    "RetryPolicy",
    "Subscription",
]
