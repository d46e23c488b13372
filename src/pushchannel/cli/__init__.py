"""The ``pushchannel`` command: ``serve``, ``publish``, ``subscribe``.

Failures print one line, ``error: ...``, to stderr and exit 1 (2 for usage errors); Ctrl-C
exits 130. The SDK and gRPC are imported only by the commands that need them, so that
``--help`` and ``--version`` are instant. Each family of commands lives in its own module with
a ``register`` function.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pushchannel import __version__
from pushchannel.cli import admin, messages, serve, token
from pushchannel.cli._common import CommandError, client_options, explain, fail
from pushchannel.errors import PushChannelError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` is the harness's own
        return _bench(argparse.Namespace(argv=argv[1:]))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse cannot take positionals after options (`publish CH --id X MESSAGE`): the
        # messages of publish may come anywhere, anything else left over is a usage error.
        if getattr(args, "message", None) is not None and not any(e.startswith("-") for e in extra):
            args.message += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result: int = args.run(args)
        return result
    except CommandError as e:
        return fail(str(e))
    except PushChannelError as e:
        return fail(explain(e, getattr(args, "server", "")))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing, and keep Python from complaining
        # about the unflushable stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _bench(args: argparse.Namespace) -> int:
    from pushchannel.bench import main as bench_main

    return bench_main(list(args.argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushchannel", description="A message push broker over gRPC, and its command-line client."
    )
    parser.add_argument("--version", action="version", version=f"pushchannel {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    serve.register(commands)
    client = client_options()
    messages.register(commands, client)
    admin.register(commands, client)
    token.register(commands)
    bench = commands.add_parser(
        "bench",
        add_help=False,
        help="benchmarks against same-run baselines (pushchannel bench --help)",
    )
    bench.add_argument("argv", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    return parser
