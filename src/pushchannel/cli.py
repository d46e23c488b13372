"""The ``pushchannel`` command: ``serve``, ``publish``, ``subscribe``.

Failures print one line, ``error: ...``, to stderr and exit 1 (2 for usage errors); Ctrl-C
exits 130. The SDK and gRPC are imported only by the commands that need them, so that
``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from pushchannel import __version__
from pushchannel.errors import (
    PermissionDenied,
    PushChannelError,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from pushchannel.client import AsyncClient, Message, OutgoingMessage

_STDIN_BATCH = 1000


class CommandError(Exception):
    """A failure the command explains in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except CommandError as e:
        return _fail(str(e))
    except PushChannelError as e:
        return _fail(_explain(e, getattr(args, "server", "")))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing, and keep Python from complaining
        # about the unflushable stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _explain(e: PushChannelError, server: str) -> str:
    text = str(e)
    if isinstance(e, Unavailable):
        lowered = text.lower()
        if "dns resolution failed" in lowered or "name resolution" in lowered:
            return f"cannot resolve the broker's address {server} (check --server)"
        if "connect" in lowered or "connection refused" in lowered:
            return f"cannot reach the broker at {server} (is 'pushchannel serve' running?)"
        return f"the broker at {server} is unavailable: {text} (try again later)"
    if isinstance(e, Unauthenticated):
        return f"the broker refused the token: {text} (set --token or PUSHCHANNEL_TOKEN)"
    if isinstance(e, PermissionDenied):
        return f"permission denied: {text} (the token does not cover this channel)"
    return f"{e.code.lower().replace('_', ' ')}: {text}"


# -- serve -----------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    try:
        from pushchannel.server.app import ServerConfig, serve
    except ImportError as e:
        raise CommandError(f"the broker cannot start: {e} (reinstall pushchannel)") from None
    try:
        config = ServerConfig(listen=args.listen)
        if args.store is not None:
            config = replace(config, store_url=args.store)
        if args.heartbeat is not None:
            config = replace(config, broker=replace(config.broker, heartbeat_interval=args.heartbeat))
    except ValueError as e:
        raise CommandError(f"bad configuration: {e}") from None
    try:
        return serve(config)
    except (ValueError, OSError) as e:
        raise CommandError(f"the broker cannot start: {e}") from None


# -- publish ---------------------------------------------------------------------------------------


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
    async with _client(args) as client:
        for batch in batches:
            for result in await client.publish_many(args.channel, batch):
                _emit(f"seq {result.seq}{' (duplicate)' if result.duplicate else ''}")
    return 0


# -- subscribe -------------------------------------------------------------------------------------


def _subscribe(args: argparse.Namespace) -> int:
    return asyncio.run(_subscribe_async(args))


async def _subscribe_async(args: argparse.Namespace) -> int:
    received = 0
    try:
        async with asyncio.timeout(args.timeout), _client(args) as client:
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
                    _emit(_format(message, args.json))
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


# -- plumbing --------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AsyncClient:
    from pushchannel.client import AsyncClient

    return AsyncClient(args.server, token=args.token or None)


def _emit(line: str) -> None:
    out = sys.stdout.buffer
    out.write(line.encode("utf-8", errors="replace") + b"\n")
    out.flush()


def _attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _start(text: str) -> str | int:
    if text in ("new", "earliest"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected new, earliest or a seq >= 1, got {text!r}")


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushchannel", description="A message push broker over gRPC, and its command-line client."
    )
    parser.add_argument("--version", action="version", version=f"pushchannel {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run a broker", description="Run a broker until SIGINT/SIGTERM."
    )
    serve.add_argument(
        "--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="default: %(default)s"
    )
    serve.add_argument(
        "--store", metavar="URL", help="memory:// (default), sqlite:///PATH, redis://HOST:PORT/DB"
    )
    serve.add_argument(
        "--heartbeat", type=_positive(float), metavar="SECONDS", help="heartbeat on idle subscriptions"
    )
    serve.set_defaults(run=_serve)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--server",
        default=os.environ.get("PUSHCHANNEL_SERVER") or "127.0.0.1:50051",
        metavar="HOST:PORT",
        help="the broker (env PUSHCHANNEL_SERVER; default: %(default)s)",
    )
    client.add_argument(
        "--token", default=os.environ.get("PUSHCHANNEL_TOKEN"), help="bearer token (env PUSHCHANNEL_TOKEN)"
    )

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
        type=_attribute,
        default=[],
        metavar="K=V",
        help="an attribute (repeatable)",
    )
    publish.add_argument("--id", help="idempotency key (one MESSAGE only; default: generated)")
    publish.add_argument(
        "--ttl", type=_positive(float), metavar="SECONDS", help="drop if not delivered within"
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
        type=_start,
        metavar="new|earliest|SEQ",
        help="where a new group starts (default: the group's own default)",
    )
    subscribe.add_argument("--count", type=_positive(int), metavar="N", help="exit 0 after N messages")
    subscribe.add_argument(
        "--timeout",
        type=_positive(float),
        metavar="S",
        help="give up after S seconds in total: exit 1 unless --count messages (without --count: "
        "any message) arrived by then",
    )
    subscribe.add_argument("--json", action="store_true", help="one JSON object per line")
    subscribe.add_argument(
        "--max-in-flight", type=_positive(int), default=100, metavar="N", help="unacked at most (%(default)s)"
    )
    subscribe.set_defaults(run=_subscribe)
    return parser


if __name__ == "__main__":
    sys.exit(main())
