"""``pushchannel token create`` (sign a JWT) and ``pushchannel token hash`` (a static token's
SHA-256 for the ``--auth`` file). See docs/security.md."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time
from pathlib import Path

from pushchannel.cli._common import CommandError, emit


def _ttl(text: str) -> float:
    from pushchannel.config_file import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return seconds


def _glob(text: str) -> str:
    if not text or len(text) > 512:
        raise argparse.ArgumentTypeError("a channel glob of 1-512 characters, such as 'hosts.*'")
    return text


def _create(args: argparse.Namespace) -> int:
    try:
        import jwt
    except ImportError:
        raise CommandError("signing JWTs needs PyJWT: pip install 'pushchannel[jwt]'") from None
    from pushchannel.server.auth import AuthConfigError, read_hs256_secret

    if not (args.publish or args.subscribe or args.admin):
        raise CommandError("the token would grant nothing: give --publish, --subscribe and/or --admin")
    path = Path(args.key)
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read the key file {path}: {e.strerror or e}") from None
    alg = args.alg or ("RS256" if b"PRIVATE KEY" in pem else "HS256")
    key: bytes
    if alg == "HS256":
        try:
            key = read_hs256_secret(path)
        except AuthConfigError as e:
            raise CommandError(str(e)) from None
    else:
        if b"PRIVATE KEY" not in pem:
            raise CommandError(f"RS256 signs with a private key (PEM); {path} holds none")
        key = pem
    now = int(time.time())
    claims: dict[str, object] = {
        "iat": now,
        "nbf": now,
        "exp": now + int(args.ttl),
        "jti": secrets.token_hex(8),
        "publish": args.publish,
        "subscribe": args.subscribe,
        "admin": args.admin,
    }
    if args.subject:
        claims["sub"] = args.subject
    if args.audience:
        claims["aud"] = args.audience
    try:
        token = jwt.encode(claims, key, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise CommandError(f"cannot sign with {path} as {alg}: {e}") from None
    except ImportError:
        raise CommandError("RS256 needs the 'cryptography' package: pip install 'pushchannel[jwt]'") from None
    emit(token)
    return 0


def _hash(args: argparse.Namespace) -> int:
    if args.generate:
        if args.token is not None:
            raise CommandError("give either TOKEN or --generate")
        token = secrets.token_urlsafe(32)
        emit(f"token  {token}")
        emit(f"sha256 {hashlib.sha256(token.encode()).hexdigest()}")
        return 0
    token = args.token
    if token is None:
        if sys.stdin.isatty():
            import getpass

            token = getpass.getpass("token (not echoed): ")
        else:
            token = sys.stdin.readline().rstrip("\r\n")
    if not token:
        raise CommandError("no token: give TOKEN, or one line on stdin")
    emit(hashlib.sha256(token.encode("utf-8")).hexdigest())
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token",
        help="issue JWTs, hash static tokens",
        description="Issue and prepare bearer tokens for a broker started with --auth FILE.",
    )
    sub = token.add_subparsers(title="token commands", required=True, metavar="COMMAND")

    create = sub.add_parser(
        "create",
        help="print a signed JWT",
        description="Print a JWT whose claims grant the given channel globs. The broker accepts it "
        "if its [jwt] section has the matching key: the same secret file (HS256), or the public "
        "half of the private key (RS256).",
    )
    create.add_argument(
        "--key", required=True, metavar="FILE", help="HS256: the secret file; RS256: the private key (PEM)"
    )
    create.add_argument(
        "--alg", choices=["HS256", "RS256"], help="default: RS256 for a private key file, else HS256"
    )
    create.add_argument(
        "--ttl", required=True, type=_ttl, metavar="DURATION", help="lifetime, e.g. 3600, 12h, 30d"
    )
    create.add_argument(
        "--publish",
        action="append",
        type=_glob,
        default=[],
        metavar="GLOB",
        help="repeatable, e.g. 'orders.*'",
    )
    create.add_argument(
        "--subscribe", action="append", type=_glob, default=[], metavar="GLOB", help="repeatable"
    )
    create.add_argument("--admin", action="store_true", help="allow the admin calls (channels, purge)")
    create.add_argument("--audience", metavar="A", help="the 'aud' claim (the broker's [jwt] audience)")
    create.add_argument("--subject", metavar="NAME", help="the 'sub' claim: the name in the broker's logs")
    create.set_defaults(run=_create)

    hash_ = sub.add_parser(
        "hash",
        help="print a static token's SHA-256 for the auth file",
        description="Print the sha256 line's value for an [[token]] entry of the auth file. With "
        "--generate, make a new random token and print it and its hash.",
    )
    hash_.add_argument("token", nargs="?", metavar="TOKEN", help="default: one line from stdin")
    hash_.add_argument("--generate", action="store_true", help="make a new random token (32 bytes)")
    hash_.set_defaults(run=_hash)
