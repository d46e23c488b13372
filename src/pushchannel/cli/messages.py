"""``pushchannel publish`` and ``pushchannel subscribe``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING

from pushchannel.cli._common import CommandError, attribute, emit, make_client, positive, start_position

if TYPE_CHECKING:
    from pushchannel.client import Message, OutgoingMessage

_STDIN_BATCH = 1000


def _publish(args: argparse.Namespace) -> int:
    from pushchannel.client import OutgoingMessage

    attributes = dict(args.attr)
    if args.id is not None and len(args.message) != 1:
        raise CommandError("--id needs exactly one MESSAGE argument (ids must be unique per message)")

    def outgoing(payload: bytes) -> OutgoingMessage:
        return OutgoingMessage(payload, id=args.id, attributes=attributes, ttl=args.ttl)

    if args.message:
        # surrogateescape: an argument that is not valid UTF-8 goes out as the bytes it was.
        batches: Iterator[list[OutgoingMessage]] = iter(
            [[outgoing(m.encode("utf-8", "surrogateescape")) for m in args.message]]
        )
    else:
        batches = _stdin_batches(outgoing, interactive=sys.stdin.isatty())
    return asyncio.run(_publish_batches(args, batches))


def _stdin_batches(
    make: Callable[[bytes], OutgoingMessage], *, interactive: bool
) -> Iterator[list[OutgoingMessage]]:
    """Blank lines are skipped; on a terminal each line goes out as it is typed."""
    lines = (line.rstrip(b"\r\n") for line in sys.stdin.buffer)
    payloads = (make(line) for line in lines if line)
    size = 1 if interactive else _STDIN_BATCH
    while batch := list(islice(payloads, size)):
        yield batch


async def _publish_batches(args: argparse.Namespace, batches: Iterator[list[OutgoingMessage]]) -> int:
    async with make_client(args) as client:
        for batch in batches:
            for result in await client.publish_many(args.channel, batch):
                emit(f"seq {result.seq}{' (duplicate)' if result.duplicate else ''}")
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    return asyncio.run(_subscribe_async(args))


async def _subscribe_async(args: argparse.Namespace) -> int:
    received = 0
    try:
        async with asyncio.timeout(args.timeout), make_client(args) as client:
            subscription = client.subscribe(
                args.channel,
                group=args.group,
                broadcast=args.broadcast,
                start=args.start,
                # No more in flight than we will ack: the rest would come back as attempt 2.
                max_in_flight=min(args.max_in_flight, args.count or args.max_in_flight),
            )
            async with subscription:
                async for message in subscription:
                    emit(_format(message, args.json))
                    await message.ack()
                    received += 1
                    if received == args.count:
                        break
    except TimeoutError:
        if received == 0:
            raise CommandError(f"no message within {args.timeout:g} s") from None
        if args.count is not None:
            raise CommandError(
                f"only {received} of {args.count} messages within {args.timeout:g} s"
            ) from None
    return 0


def _format(message: Message, as_json: bool) -> str:
    text = message.payload.decode("utf-8", errors="replace")
    if not as_json:
        return text
    return json.dumps(
        {
            "channel": message.channel,
            "seq": message.seq,
            "id": message.id,
            "payload": text,
            "attributes": message.attributes,
            "publish_time": message.publish_time.isoformat(),
            "attempt": message.attempt,
        },
        ensure_ascii=False,
    )


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    publish = commands.add_parser(
        "publish",
        parents=[client],
        help="publish messages",
        description="Publish each MESSAGE, or without MESSAGE one message per line of stdin "
        "(blank lines skipped). Prints 'seq N' per message, '(duplicate)' if its id was seen.",
    )
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("message", nargs="*", metavar="MESSAGE")
    publish.add_argument(
        "--attr",
        action="append",
        type=attribute,
        default=[],
        metavar="K=V",
        help="an attribute (repeatable)",
    )
    publish.add_argument("--id", help="idempotency key (one MESSAGE only; default: generated)")
    publish.add_argument(
        "--ttl", type=positive(float), metavar="SECONDS", help="drop if not delivered within"
    )
    publish.set_defaults(run=_publish)

    subscribe = commands.add_parser(
        "subscribe",
        parents=[client],
        help="print messages as they arrive",
        description="Print each message's payload on a line (or a JSON object with --json) and "
        "ack it once printed.",
    )
    subscribe.add_argument("channel", metavar="CHANNEL")
    subscribe.add_argument("--group", default="default", help="consumer group (default: %(default)s)")
    subscribe.add_argument(
        "--broadcast", action="store_true", help="get every message, in a group of its own"
    )
    subscribe.add_argument(
        "--from",
        dest="start",
        type=start_position,
        metavar="new|earliest|SEQ",
        help="where a new group starts (default: the group's own default)",
    )
    subscribe.add_argument("--count", type=positive(int), metavar="N", help="exit 0 after N messages")
    subscribe.add_argument(
        "--timeout",
        type=positive(float),
        metavar="S",
        help="give up after S seconds in total: exit 1 unless --count messages (without --count: "
        "any message) arrived by then",
    )
    subscribe.add_argument("--json", action="store_true", help="one JSON object per line")
    subscribe.add_argument(
        "--max-in-flight", type=positive(int), default=100, metavar="N", help="unacked at most (%(default)s)"
    )
    subscribe.set_defaults(run=_subscribe)
