"""What every command shares: the one-line failure, output, argument types, the client."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from pushchannel.errors import PermissionDenied, PushChannelError, Unauthenticated, Unavailable

if TYPE_CHECKING:
    import grpc

    from pushchannel.client import AsyncClient


class CommandError(Exception):
    """A failure the command explains in one line."""


def fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def explain(e: PushChannelError, server: str) -> str:
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


def client_options() -> argparse.ArgumentParser:
    """The options of every command that talks to a broker."""
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
    client.add_argument(
        "--retry-for",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up once the broker has been unreachable this long (default: %(default)s; 0: never)",
    )
    tls = client.add_argument_group("TLS (any of these turns TLS on)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    for flag, env, text in (
        ("--tls-ca", "PUSHCHANNEL_TLS_CA", "trust the broker certificates this CA file (PEM) signed"),
        ("--tls-cert", "PUSHCHANNEL_TLS_CERT", "mutual TLS: this client certificate (PEM)"),
        ("--tls-key", "PUSHCHANNEL_TLS_KEY", "mutual TLS: the client certificate's key (PEM)"),
    ):
        default = os.environ.get(env) or None
        tls.add_argument(flag, default=default, metavar="FILE", help=f"{text} (env {env})")
    return client


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The TLS credentials the client options ask for; None: plain TCP."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from pushchannel.server.tls import client_credentials

    return client_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def make_client(args: argparse.Namespace) -> AsyncClient:
    from pushchannel.client import AsyncClient, RetryPolicy

    tls = credentials(args)
    # One-shot commands must not wait forever for a broker that is not there.
    retry = RetryPolicy(deadline=args.retry_for or None)
    return AsyncClient(args.server, token=args.token or None, tls=tls, retry=retry)


def emit(line: str) -> None:
    out = sys.stdout.buffer
    out.write(line.encode("utf-8", errors="replace") + b"\n")
    out.flush()


def attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def start_position(text: str) -> str | int:
    if text in ("new", "earliest"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected new, earliest or a seq >= 1, got {text!r}")


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse
