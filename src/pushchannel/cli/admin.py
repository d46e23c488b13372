"""Admin commands: ``channels``, ``channel NAME``, ``purge NAME``, ``delete NAME``, ``health``.

Each prints a table or a summary for people, or one JSON document with ``--json`` for
scripts. They call the broker's admin RPCs (an ``admin`` token where auth is on) and the
standard gRPC health service.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pushchannel.cli._common import CommandError, credentials, emit, positive
from pushchannel.errors import error_for_code

if TYPE_CHECKING:
    import grpc

    from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

T = TypeVar("T")
Row = Sequence[str]
Table = Sequence[Row]


# -- talking to the broker -------------------------------------------------------------------------
def _open(args: argparse.Namespace) -> grpc.Channel:
    import grpc

    creds = credentials(args)
    return grpc.secure_channel(args.server, creds) if creds else grpc.insecure_channel(args.server)


def _call(args: argparse.Namespace, do: Callable[[grpc.Channel, tuple[tuple[str, str], ...]], T]) -> T:
    """Run ``do(channel, metadata)``; gRPC failures come out as pushchannel errors."""
    import grpc

    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    with _open(args) as channel:
        try:
            return do(channel, metadata)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            raise error_for_code(code.name, e.details() or "") from None


def _stub(channel: grpc.Channel) -> Any:
    from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc

    return broker_pb2_grpc.BrokerStub(channel)  # type: ignore[no-untyped-call]


# -- shaping ---------------------------------------------------------------------------------------
def channel_dict(info: pb.ChannelInfo) -> dict[str, Any]:
    """The JSON form of a channel (``--json``); a stable contract, independent of the proto."""
    return {
        "name": info.name,
        "depth": info.depth,
        "bytes": info.bytes,
        "oldest_age_s": round(info.oldest_age_s, 3),
        "first_seq": info.first_seq,
        "last_seq": info.last_seq,
        "dropped": info.dropped,
        "expired": info.expired,
        "groups": [
            {"name": g.name, "cursor": g.cursor, "lag": g.lag, "pending": g.pending, "consumers": g.consumers}
            for g in info.groups
        ],
        "consumers": [
            {
                "id": c.id,
                "group": c.group,
                "mode": "broadcast" if c.broadcast else "queue",
                "peer": c.peer,
                "since": _iso(c.since_ms),
                "in_flight": c.in_flight,
            }
            for c in info.consumers
        ],
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def human_age(seconds: float) -> str:
    s = int(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render(table: Table, numeric: set[int]) -> list[str]:
    """Columns padded to their widest cell; ``numeric`` columns right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _group_rows(info: pb.ChannelInfo) -> list[tuple[str, str, str, str]]:
    """(group, lag, pending, consumers) per durable group, then broadcast consumers."""
    rows = [(g.name, str(g.lag), str(g.pending), str(g.consumers)) for g in info.groups]
    broadcast = sum(1 for c in info.consumers if c.broadcast)
    if broadcast:
        rows.append(("(broadcast)", "-", "-", str(broadcast)))
    return rows or [("-", "-", "-", "0")]


def channels_table(infos: Sequence[pb.ChannelInfo]) -> list[str]:
    table: list[Row] = [("CHANNEL", "DEPTH", "BYTES", "OLDEST", "GROUP", "LAG", "PENDING", "CONSUMERS")]
    for info in infos:
        first = (info.name, str(info.depth), human_bytes(info.bytes), _oldest(info))
        for i, group in enumerate(_group_rows(info)):
            table.append((*(first if i == 0 else ("", "", "", "")), *group))
    return render(table, numeric={1, 2, 5, 6, 7})


def _oldest(info: pb.ChannelInfo) -> str:
    return human_age(info.oldest_age_s) if info.depth else "-"


def channel_report(info: pb.ChannelInfo, now: float) -> list[str]:
    lines = [
        f"channel   {info.name}",
        f"depth     {info.depth} messages, {human_bytes(info.bytes)}",
        f"seqs      {info.first_seq}..{info.last_seq}"
        if info.depth
        else f"seqs      none (last {info.last_seq})",
        f"oldest    {_oldest(info)}",
        f"dropped   {info.dropped} (retention limits)",
        f"expired   {info.expired} (ttl)",
        "",
    ]
    groups: list[Row] = [("GROUP", "CURSOR", "LAG", "PENDING", "CONSUMERS")]
    groups += [(g.name, str(g.cursor), str(g.lag), str(g.pending), str(g.consumers)) for g in info.groups]
    lines += render(groups, numeric={1, 2, 3, 4}) if info.groups else ["no durable groups"]
    lines.append("")
    if not info.consumers:
        return [*lines, "no consumers connected"]
    consumers: list[Row] = [("CONSUMER", "GROUP", "MODE", "PEER", "CONNECTED", "IN-FLIGHT")]
    for c in info.consumers:
        mode = "broadcast" if c.broadcast else "queue"
        since = human_age(max(0.0, now - c.since_ms / 1000)) + " ago"
        consumers.append((c.id, c.group, mode, c.peer, since, str(c.in_flight)))
    return lines + render(consumers, numeric={5})


def _print_json(data: object) -> None:
    emit(json.dumps(data, ensure_ascii=False, indent=2))


# -- the commands ----------------------------------------------------------------------------------
def _channels(args: argparse.Namespace) -> int:
    from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

    def do(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
        request = pb.ListChannelsRequest(prefix=args.prefix)
        return _stub(channel).ListChannels(request, timeout=args.timeout, metadata=md)

    infos = sorted(_call(args, do).channels, key=lambda i: i.name)
    if args.json:
        _print_json([channel_dict(i) for i in infos])
    elif not infos:
        emit(f"no channels{f' starting with {args.prefix!r}' if args.prefix else ''}")
    else:
        for line in channels_table(infos):
            emit(line)
    return 0


def _channel(args: argparse.Namespace) -> int:
    from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

    def do(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
        request = pb.GetChannelRequest(channel=args.name)
        return _stub(channel).GetChannel(request, timeout=args.timeout, metadata=md)

    info = _call(args, do)
    if args.json:
        _print_json(channel_dict(info))
    else:
        for line in channel_report(info, time.time()):
            emit(line)
    return 0


def _purge(args: argparse.Namespace) -> int:
    from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

    def do(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
        request = pb.PurgeChannelRequest(channel=args.name)
        return _stub(channel).PurgeChannel(request, timeout=args.timeout, metadata=md)

    purged = int(_call(args, do).purged)
    if args.json:
        _print_json({"channel": args.name, "purged": purged})
    else:
        emit(f"purged {purged} message{'' if purged == 1 else 's'} from {args.name}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb

    def do(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
        stub = _stub(channel)
        if args.group is not None:
            group_request = pb.DeleteGroupRequest(channel=args.name, group=args.group)
            return stub.DeleteGroup(group_request, timeout=args.timeout, metadata=md)
        request = pb.DeleteChannelRequest(channel=args.name)
        return stub.DeleteChannel(request, timeout=args.timeout, metadata=md)

    deleted = bool(_call(args, do).deleted)
    what = f"group '{args.group}' of channel '{args.name}'" if args.group else f"channel '{args.name}'"
    if not deleted:
        raise CommandError(f"{what} does not exist (see 'pushchannel channels')")
    if args.json:
        out: dict[str, object] = {"channel": args.name, "deleted": True}
        if args.group is not None:
            out["group"] = args.group
        _print_json(out)
    else:
        emit(f"deleted {what}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def do(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
        request = health_pb2.HealthCheckRequest(service=args.service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout, metadata=md)

    status = health_pb2.HealthCheckResponse.ServingStatus.Name(_call(args, do).status)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        emit(status)
    return 0 if status == "SERVING" else 1


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[client])
    common.add_argument("--json", action="store_true", help="one JSON document instead of text")
    common.add_argument(
        "--timeout",
        type=positive(float),
        default=10.0,
        metavar="S",
        help="give up after S seconds (%(default)s)",
    )

    channels = commands.add_parser(
        "channels",
        parents=[common],
        help="list channels (admin)",
        description="Every channel with its depth, bytes and oldest message, and each of its groups "
        "with lag (messages not yet delivered), pending (delivered, not acked) and consumers.",
    )
    channels.add_argument("--prefix", default="", help="only channels whose name starts with this")
    channels.set_defaults(run=_channels)

    channel = commands.add_parser(
        "channel",
        parents=[common],
        help="show one channel (admin)",
        description="One channel in detail: its groups and its connected consumers.",
    )
    channel.add_argument("name", metavar="NAME")
    channel.set_defaults(run=_channel)

    purge = commands.add_parser(
        "purge",
        parents=[common],
        help="drop a channel's messages (admin)",
        description="Drop every stored message of NAME; the channel, its groups and consumers stay.",
    )
    purge.add_argument("name", metavar="NAME")
    purge.set_defaults(run=_purge)

    delete = commands.add_parser(
        "delete",
        parents=[common],
        help="delete a channel or one of its groups (admin)",
        description="Delete NAME with its messages and groups (its consumers are disconnected with "
        "NOT_FOUND), or with --group only that group.",
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--group", metavar="GROUP", help="delete only this group of the channel")
    delete.set_defaults(run=_delete)

    health = commands.add_parser(
        "health",
        parents=[common],
        help="ask the broker's health service",
        description="Print SERVING (exit 0) or NOT_SERVING (exit 1), from the standard gRPC health "
        "service; for container and service-manager health checks.",
    )
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    health.set_defaults(run=_health)


__all__ = ["channel_dict", "channels_table", "register"]
