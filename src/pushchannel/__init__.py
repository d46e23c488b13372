"""pushchannel: a message push broker over gRPC, and its Python SDK.

::

    async with pushchannel.AsyncClient("localhost:50051") as client:
        await client.publish("hosts.berlin-1", b"reboot")
        async for msg in client.subscribe("hosts.berlin-1"):
            handle(msg.payload)
            await msg.ack()

:class:`Client` is the same without ``await``. Errors the broker answers with raise subclasses of
:class:`PushChannelError` (see :mod:`pushchannel.errors` for the tree).

Importing this package is cheap and does nothing: the SDK (and gRPC with it) is imported on
first access to one of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pushchannel.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PushChannelError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from pushchannel.client import (
        AsyncClient,
        BlockingSubscription,
        Client,
        ConnectionState,
        Message,
        OutgoingMessage,
        PublishResult,
        RetryPolicy,
        StateChange,
        Subscription,
    )

__version__ = "0.1.0"

_SDK_NAMES = frozenset(
    {
        "AsyncClient",
        "BlockingSubscription",
        "Client",
        "ConnectionState",
        "Message",
        "OutgoingMessage",
        "PublishResult",
        "RetryPolicy",
        "StateChange",
        "Subscription",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        value = getattr(importlib.import_module("pushchannel.client"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pushchannel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SDK_NAMES)


__all__ = [
    "AsyncClient",
    "BlockingSubscription",
    "Cancelled",
    "Client",
    "ConnectionState",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "Message",
    "NotFound",
    "OutgoingMessage",
    "PermissionDenied",
    "PublishResult",
    "PushChannelError",
    "ResourceExhausted",
    "RetryPolicy",
    "StateChange",
    "Subscription",
    "Unauthenticated",
    "Unavailable",
]
