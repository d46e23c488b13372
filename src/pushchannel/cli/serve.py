"""``pushchannel serve``: the config file first, then flags over it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from pushchannel._grpc_env import use_fused_filters
from pushchannel.cli._common import CommandError, positive
from pushchannel.config import ServerConfig


def build_config(args: argparse.Namespace) -> ServerConfig:
    """Defaults, then ``--config FILE``, then flags; a bad value is a one-line CommandError."""
    from pushchannel.config_file import ConfigError, load, parse_duration, parse_size

    try:
        config = load(args.config) if args.config else ServerConfig()
        flags: dict[str, object] = {}
        if args.listen is not None:
            flags["listen"] = args.listen
        if args.store is not None:
            flags["store_url"] = args.store
        if args.fsync is not None:
            flags["fsync"] = args.fsync
        if args.grace is not None:
            flags["grace"] = args.grace
        if args.metrics_listen is not None:
            flags["metrics_listen"] = args.metrics_listen
        if args.log_format is not None:
            flags["log_format"] = args.log_format
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_file", "max_concurrent_streams"):
            if getattr(args, name) is not None:  # security flags (docs/security.md)
                flags[name] = getattr(args, name)
        if args.insecure:
            flags["insecure"] = True
        broker = config.broker
        if args.heartbeat is not None:
            broker = replace(broker, heartbeat_interval=args.heartbeat)
        if args.max_delivery_attempts is not None:
            broker = replace(broker, max_delivery_attempts=args.max_delivery_attempts)
        policy: dict[str, Any] = {}
        if args.max_age is not None:
            policy["max_age"] = parse_duration(args.max_age)
        if args.max_messages is not None:
            policy["max_messages"] = args.max_messages
        if args.max_bytes is not None:
            policy["max_bytes"] = parse_size(args.max_bytes)
        if args.discard is not None:
            policy["discard"] = args.discard
        if args.max_payload is not None:
            broker = replace(broker, limits=replace(broker.limits, max_payload=parse_size(args.max_payload)))
        if policy:  # flags set the default for channels that no [[channel]] pattern matches
            broker = replace(broker, default_policy=replace(broker.default_policy, **policy))
        return replace(config, broker=broker, **flags)  # type: ignore[arg-type]
    except ConfigError as e:
        raise CommandError(str(e)) from None
    except ValueError as e:
        raise CommandError(f"bad configuration: {e}") from None


def _printable(config: ServerConfig) -> str:
    data = asdict(config)
    data["broker"]["policies"] = [{"pattern": r.pattern, **asdict(r.policy)} for r in config.broker.policies]
    return json.dumps(data, indent=2)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.print_config:
        print(_printable(config))
        return 0
    use_fused_filters()  # before gRPC is imported: see pushchannel._grpc_env
    try:
        from pushchannel.server.app import serve
    except ImportError as e:
        raise CommandError(f"the broker cannot start: {e} (reinstall pushchannel)") from None
    try:
        return serve(config)
    except (ValueError, OSError) as e:
        raise CommandError(f"the broker cannot start: {e}") from None


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a broker",
        description="Run a broker until SIGINT/SIGTERM (a second signal exits at once). "
        "Settings come from --config FILE, then from these flags.",
    )
    serve.add_argument("--config", metavar="FILE.toml", help="config file (see docs/operations.md)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="default: 127.0.0.1:50051")
    serve.add_argument(
        "--store",
        metavar="URL",
        help="sqlite:///PATH (default: sqlite:///pushchannel-data/pushchannel.db), memory://, "
        "redis://HOST:PORT/DB or redis+cluster://HOST:PORT (docs/scaling.md)",
    )
    serve.add_argument(
        "--fsync",
        choices=["normal", "full"],
        help="sqlite: normal survives a process crash, full also a power loss (default: normal)",
    )
    serve.add_argument("--grace", type=positive(float), metavar="SECONDS", help="drain time on SIGTERM (10)")
    serve.add_argument(
        "--heartbeat", type=positive(float), metavar="SECONDS", help="heartbeat on idle subscriptions (15)"
    )
    serve.add_argument(
        "--max-delivery-attempts", type=positive(int), metavar="N", help="then dead-letter (10)"
    )
    serve.add_argument("--max-age", metavar="DURATION", help="retention per channel, e.g. 7d (default)")
    serve.add_argument("--max-messages", type=positive(int), metavar="N", help="per channel (1000000)")
    serve.add_argument("--max-bytes", metavar="SIZE", help="per channel, e.g. 1GiB (default)")
    serve.add_argument(
        "--discard", choices=["drop-oldest", "reject"], help="on a full channel (default: drop-oldest)"
    )
    serve.add_argument("--max-payload", metavar="SIZE", help="largest payload, e.g. 1MiB (default)")
    serve.add_argument(
        "--metrics-listen",
        nargs="?",
        const="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (alone: 127.0.0.1:9464; default: off)",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines on stderr (default: text)")
    security = serve.add_argument_group("security (docs/security.md)")
    security.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    security.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    security.add_argument(
        "--tls-client-ca", metavar="FILE", help="mutual TLS: require client certificates signed by this CA"
    )
    security.add_argument(
        "--auth", dest="auth_file", metavar="FILE", help="tokens and JWT keys (TOML); SIGHUP re-reads it"
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving without authentication on a non-loopback address",
    )
    security.add_argument(
        "--max-concurrent-streams", type=positive(int), metavar="N", help="per connection (1000)"
    )
    serve.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    serve.set_defaults(run=run)
