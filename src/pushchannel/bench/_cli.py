"""``pushchannel bench``: arguments, the order of scenarios, and where the report goes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pushchannel._gc import tuned_collector
from pushchannel.bench import _load, _report, _scenarios, _targets
from pushchannel.bench._peers import run_peers
from pushchannel.bench._procs import BenchError, machine
from pushchannel.bench._scenarios import OURS, Options, ScenarioResult
from pushchannel.bench._servers import loop_factory

GATEWAY_STREAMS = 100  # streams per connection of the gateway runs in "all"
SCENARIOS = ("throughput", "latency", "fanout", "streams", "seed", "peers")


@dataclasses.dataclass(frozen=True)
class Shapes:
    throughput: _load.ThroughputParams = dataclasses.field(default_factory=_load.ThroughputParams)
    latency: _load.LatencyParams = dataclasses.field(default_factory=_load.LatencyParams)
    fanout: _load.FanoutParams = dataclasses.field(default_factory=_load.FanoutParams)
    streams: _load.StreamsParams = dataclasses.field(default_factory=_load.StreamsParams)
    seed: _load.SeedParams = dataclasses.field(default_factory=_load.SeedParams)


# The shapes of the targets, and tiny ones for tests (--quick).
FULL = Shapes()
QUICK = Shapes(
    throughput=_load.ThroughputParams(producers=1, consumers=2, messages=2000, timeout=30),
    latency=_load.LatencyParams(messages=200, timeout=30),
    fanout=_load.FanoutParams(subscribers=10, rounds=3, timeout=30),
    streams=_load.StreamsParams(streams=20, settle=0.2, timeout=30),
    seed=_load.SeedParams(producers=8, messages=200, timeout=30),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pushchannel bench",
        description="Measure the broker and, in the same run, the raw-gRPC ceiling and a minimal broker "
        "for the same shape; report medians and ratios. Every server runs in a process of its own on "
        "127.0.0.1.",
    )
    p.add_argument(
        "scenario",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of: all (the default), {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--repeat", type=_positive, default=3, metavar="N", help="runs per figure (median; %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="tiny counts (for tests; no target is judged)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="the report as JSON: on stdout instead of the table, or into FILE (and the table on stdout)",
    )
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a chart (needs matplotlib)")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy flame graphs of the broker per scenario"
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="memory|sqlite|URL",
        help="the broker's store (memory; 'all' measures throughput on memory and sqlite)",
    )
    p.add_argument("--peers-dir", type=Path, metavar="DIR", help="where the peer files are (bench/peers)")
    p.add_argument("--payload", type=_positive, metavar="BYTES", help="payload size for every scenario (100)")
    g = p.add_argument_group("throughput (and the peers' throughput)")
    g.add_argument("--producers", type=_positive, metavar="N")
    g.add_argument("--consumers", type=_positive, metavar="N")
    g.add_argument("--messages", type=_positive, metavar="N")
    g.add_argument("--batch", type=_positive, metavar="N", help="messages per PublishRequest")
    g.add_argument("--mode", choices=["queue", "broadcast"])
    g.add_argument("--max-in-flight", type=_positive, metavar="N")
    g.add_argument(
        "--window", type=_positive, metavar="N", help="PublishStream requests in flight per producer"
    )
    g = p.add_argument_group("latency (and the peers' latency)")
    g.add_argument("--rate", type=float, metavar="MSG/S")
    g.add_argument("--latency-messages", type=_positive, metavar="N")
    g = p.add_argument_group("fanout")
    g.add_argument("--subscribers", type=_positive, metavar="N")
    g.add_argument("--rounds", type=_positive, metavar="N")
    g = p.add_argument_group("streams")
    g.add_argument("--streams", type=_positive, metavar="N")
    g.add_argument(
        "--per-connection",
        type=_positive,
        metavar="N",
        help="streams per connection (1: a connection each, as hosts; with --client sdk, N > 1 "
        "opens them all through one client with streams_per_connection=N, as a gateway)",
    )
    g.add_argument(
        "--client",
        choices=["raw", "sdk", "both"],
        help="who opens the streams: raw stubs (default), SDK clients (pushchannel only), or both "
        "('all' does both)",
    )
    g = p.add_argument_group("seed")
    g.add_argument("--seed-producers", type=_positive, metavar="N", help="SubmitMessage calls in flight")
    g.add_argument("--seed-messages", type=_positive, metavar="N")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _params(args: argparse.Namespace) -> Shapes:
    base = QUICK if args.quick else FULL
    payload: dict[str, Any] = {"payload": args.payload} if args.payload else {}

    def pick(**names: Any) -> dict[str, Any]:
        return {k: v for k, v in names.items() if v is not None}

    return Shapes(
        throughput=dataclasses.replace(
            base.throughput,
            **payload,
            **pick(
                producers=args.producers,
                consumers=args.consumers,
                messages=args.messages,
                batch=args.batch,
                mode=args.mode,
                max_in_flight=args.max_in_flight,
                window=args.window,
            ),
        ),
        latency=dataclasses.replace(
            base.latency, **payload, **pick(rate=args.rate, messages=args.latency_messages)
        ),
        fanout=dataclasses.replace(
            base.fanout,
            **payload,
            **pick(subscribers=args.subscribers, rounds=args.rounds, per_connection=args.per_connection),
        ),
        streams=dataclasses.replace(
            base.streams, **payload, **pick(streams=args.streams, per_connection=args.per_connection)
        ),
        seed=dataclasses.replace(
            base.seed, **payload, **pick(producers=args.seed_producers, messages=args.seed_messages)
        ),
    )


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    chosen = args.scenario or ["all"]
    unknown = [s for s in chosen if s != "all" and s not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario {unknown[0]!r}: use all or {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install 'pushchannel[bench]')", file=sys.stderr)
            return 2
    scenarios = list(SCENARIOS) if "all" in chosen else [s for s in SCENARIOS if s in chosen]
    _raise_fd_limit()
    command = shlex.join(["pushchannel", "bench", *argv])
    started = datetime.datetime.now(datetime.UTC)
    info = machine()
    info["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    warnings = []
    if os.getloadavg()[0] > 0.5:
        warnings.append(
            f"the machine was busy when the run started (load average {info['loadavg']}): "
            "figures are lower and noisier than on a quiet machine"
        )
    options = Options(repeat=args.repeat, quick=args.quick, profile_dir=args.profile)
    t0 = time.perf_counter()
    # SIGTERM (e.g. from `timeout`) stops like Ctrl-C: every server started is stopped.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # The load process runs with the servers' collector settings: its 5,000 fanout readers
        # would otherwise pay the full passes that the broker no longer does.
        with tuned_collector(), asyncio.Runner(loop_factory=loop_factory()) as runner:
            results = runner.run(_run(scenarios, "all" in chosen, args, options))
    except KeyboardInterrupt:
        print("interrupted: every server the harness started was stopped", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = _report.Report(
        command=command,
        started=started.isoformat(timespec="seconds"),
        duration_s=time.perf_counter() - t0,
        machine=info,
        options={"repeat": args.repeat, "quick": args.quick},
        results=results,
        targets=[] if args.quick else _targets.judge(results),
        warnings=warnings,
    )
    if args.plot is not None:
        _report.plot(report, args.plot)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(_report.markdown(report, args.plot, args.markdown))
    doc = json.dumps(_report.to_json(report), indent=2)
    if args.json is not None and args.json != "-":
        Path(args.json).write_text(doc + "\n")
    if args.json == "-":
        print(doc)
    else:
        print(_report.table(report), end="")
    failed = any(r.systems.get(OURS) is not None and r.systems[OURS].error for r in results)
    return 1 if failed else 0


async def _run(
    names: list[str], everything: bool, args: argparse.Namespace, options: Options
) -> list[ScenarioResult]:
    shapes = _params(args)
    both_stores = args.store == "all" or (everything and args.store is None)
    store = "memory" if args.store in (None, "all") else args.store
    results: list[ScenarioResult] = []
    for name in names:
        scenarios: list[_scenarios.Scenario] = []
        if name == "throughput":
            scenarios.append(_scenarios.throughput(shapes.throughput, store))
            if both_stores:
                scenarios.append(_scenarios.throughput(shapes.throughput, "sqlite"))
        elif name == "latency":
            scenarios.append(_scenarios.latency(shapes.latency, store))
        elif name == "fanout":
            scenarios.append(_scenarios.fanout(shapes.fanout, store))
        elif name == "streams":
            client = args.client or ("both" if everything else "raw")
            # "all" also runs the hosts behind one gateway: one SDK client, 100 streams per
            # connection, beside raw stubs sharing connections the same way.
            shared = [GATEWAY_STREAMS] if everything and args.per_connection is None else []
            for per_connection in [shapes.streams.per_connection, *shared]:
                shape = dataclasses.replace(shapes.streams, per_connection=per_connection)
                if client in ("raw", "both"):
                    scenarios.append(_scenarios.streams(dataclasses.replace(shape, client="raw"), store))
                if client in ("sdk", "both"):
                    scenarios.append(_scenarios.streams(dataclasses.replace(shape, client="sdk"), store))
        elif name == "seed":
            scenarios.append(_scenarios.seed(shapes.seed, store))
        elif name == "peers":
            results.append(
                await run_peers(shapes.throughput, shapes.latency, options, results, args.peers_dir)
            )
        for sc in scenarios:
            results.append(await _scenarios.run_scenario(sc, options))
    return results


def _raise_fd_limit() -> None:
    """Thousands of streams, each on its own connection, need as many descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
