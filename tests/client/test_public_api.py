"""The public names of `pushchannel`, pinned; importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pushchannel
import pushchannel.errors

ROOT = Path(__file__).resolve().parents[2]


def test_exported_names_are_pinned() -> None:
    assert sorted(pushchannel.__all__) == [
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
    for name in pushchannel.__all__:
        assert getattr(pushchannel, name) is not None
    assert pushchannel.__version__ == "0.1.0"


def test_sdk_names_are_pinned() -> None:
    import pushchannel.client

    assert sorted(pushchannel.client.__all__) == [
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
    for name in pushchannel.client.__all__:
        assert getattr(pushchannel.client, name) is not None
    assert pushchannel.ConnectionState is pushchannel.client.ConnectionState


def test_every_error_class_is_exported() -> None:
    errors = {
        name
        for name, value in vars(pushchannel.errors).items()
        if isinstance(value, type) and issubclass(value, pushchannel.PushChannelError)
    }
    assert errors <= set(pushchannel.__all__)


def test_import_is_cheap_and_side_effect_free() -> None:
    code = (
        "import sys, threading, pushchannel\n"
        "assert 'grpc' not in sys.modules, 'grpc imported'\n"
        "assert 'pushchannel.server' not in sys.modules\n"
        "assert threading.active_count() == 1\n"
        "pushchannel.Client\n"
        "assert 'pushchannel.server' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_unknown_attribute() -> None:
    try:
        pushchannel.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_message_settles_once_and_in_both_faces() -> None:
    settled: list[tuple[str, int]] = []

    class Sink:
        def ack(self, tag: int) -> None:
            settled.append(("ack", tag))

        def nack(self, tag: int, delay: float, reason: str) -> None:
            settled.append(("nack", tag))

    from datetime import UTC, datetime

    m = pushchannel.Message(
        channel="c",
        seq=1,
        id="i",
        payload=b"p",
        attributes={},
        publish_time=datetime.now(UTC),
        attempt=1,
        delivery_tag=7,
        sink=Sink(),
    )
    m.ack()
    m.nack()
    assert settled == [("ack", 7)]

    import asyncio

    async def awaited() -> None:
        await m.ack()

    asyncio.run(awaited())
