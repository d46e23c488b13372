"""Scenarios: what each one runs against which servers, its metrics, medians and ratios, and
the targets of the benchmark issue judged on figures of the same run."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pushchannel.bench import _hosts, _load
from pushchannel.bench._procs import BenchError, Profiler, Server, start_baseline, start_broker
from pushchannel.bench._stats import median

OURS = "pushchannel"
RAW = "raw"
MINIMAL = "minimal"
SYSTEM_LABELS = {OURS: "pushchannel", RAW: "raw gRPC", MINIMAL: "minimal broker"}


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    digits: int = 0  # after the decimal point


@dataclass
class SystemRuns:
    runs: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    def median(self, key: str) -> float:
        return median([r[key] for r in self.runs if key in r])


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any]
    metrics: list[Metric]
    systems: dict[str, SystemRuns]
    ratio_metrics: list[str]
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def label(self) -> str:
        """The name with what tells two runs of one scenario apart (store, who opens streams)."""
        extra = []
        store = self.params.get("store")
        if isinstance(store, str) and store != "memory":
            extra.append(store)
        if self.params.get("client") == "sdk":
            extra.append("SDK clients")
        return f"{self.name} ({', '.join(extra)})" if extra else self.name

    def median(self, system: str, key: str) -> float:
        runs = self.systems.get(system)
        return runs.median(key) if runs is not None else math.nan

    def ratios(self) -> dict[str, dict[str, float]]:
        """Our median over each baseline's median, from this very run."""
        out: dict[str, dict[str, float]] = {}
        for key in self.ratio_metrics:
            ours = self.median(OURS, key)
            for system in self.systems:
                if system == OURS:
                    continue
                theirs = self.median(system, key)
                if math.isfinite(ours) and math.isfinite(theirs) and theirs > 0:
                    out.setdefault(key, {})[system] = ours / theirs
        return out


@dataclass(frozen=True, slots=True)
class Options:
    repeat: int = 3
    quick: bool = False
    profile_dir: Path | None = None
    verbose: bool = True


Driver = Callable[[Server, Any], Awaitable[dict[str, float]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    params: Any
    warmup: Any | None
    systems: tuple[str, ...]
    metrics: tuple[Metric, ...]
    ratio_metrics: tuple[str, ...]
    driver: Driver
    store: str = "memory"
    fresh_server: bool = False  # a new server process per run (memory figures)
    notes: Callable[[dict[str, SystemRuns]], list[str]] = lambda _: []
    about: tuple[str, ...] = ()  # what the figures mean, for the report


def log(options: Options, text: str) -> None:
    if options.verbose:
        print(text, file=sys.stderr, flush=True)


def _start(system: str, store: str) -> Server:
    return start_broker(store) if system == OURS else start_baseline(system)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


async def run_scenario(sc: Scenario, options: Options) -> ScenarioResult:
    result = ScenarioResult(
        name=sc.name,
        title=sc.title,
        params={"store": sc.store, **dataclasses.asdict(sc.params)},
        metrics=list(sc.metrics),
        systems={s: SystemRuns() for s in sc.systems},
        ratio_metrics=list(sc.ratio_metrics),
    )
    log(options, f"== {sc.name}: {sc.title}")
    if sc.fresh_server:
        await _run_fresh(sc, options, result)
    else:
        await _run_shared(sc, options, result)
    result.notes = [*sc.about, *sc.notes(result.systems)]
    return result


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float:
    """CPU seconds the machine has been busy (Linux: /proc/stat); elsewhere, this process's."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        t = os.times()
        return t.user + t.system
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return (sum(fields) - fields[3] - fields[4]) / _TICK


async def _settle(
    window: float = 0.2,
    quiet: float = 0.1,
    limit: float = 3.0,
    busy_seconds: Callable[[], float] = _busy_seconds,
) -> None:
    """Start every run on a quiet machine: nothing left of the run before to collect or tear
    down. This (the load) process collects its garbage now; then the run waits, up to ``limit``
    s, for a ``window`` in which the machine used under ``quiet`` of a core: gRPC tears closed
    channels down in threads of its own, and a server may still be finishing the run before
    (the baselines' servers stay up between runs).

    The streams scenario's 10,000 SDK clients once left 1.6 million objects in reference
    cycles (the SDK no longer does); the full pass that freed them took 3.4 s, fell into the
    next scenario's first run (the broker's: it goes first) and measured the seed path at 0.86x
    of the minimal broker instead of 0.91-0.95x. Tearing down their channels still takes about
    a second of CPU right after the scenario.

    ``busy_seconds`` is the meter: the machine's busy CPU seconds.
    """
    gc.collect()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before, t0 = busy_seconds(), time.monotonic()
        await asyncio.sleep(window)
        if busy_seconds() - before < quiet * (time.monotonic() - t0):
            return


async def _measure(
    sc: Scenario, system: str, server: Server, params: Any, runs: SystemRuns, label: str
) -> None:
    await _settle()
    started = time.perf_counter()
    try:
        figures = await sc.driver(server, params)
    except (BenchError, grpc.aio.AioRpcError, OSError) as e:
        runs.error = _describe(e)
        print(f"   {system:<12} {label}: failed: {runs.error}", file=sys.stderr, flush=True)
        return
    if label != "warm-up":
        runs.runs.append(figures)
    shown = ", ".join(f"{m.key}={figures[m.key]:,.{m.digits}f}" for m in sc.metrics if m.key in figures)
    print(
        f"   {system:<12} {label}: {shown} ({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


async def _run_shared(sc: Scenario, options: Options, result: ScenarioResult) -> None:
    """One server per system for the whole scenario; runs interleaved across systems."""
    servers: dict[str, Server] = {}
    profiler: Profiler | None = None
    try:
        started = await asyncio.gather(
            *(asyncio.to_thread(_start, system, sc.store) for system in sc.systems), return_exceptions=True
        )
        fatal: BaseException | None = None
        for system, server in zip(sc.systems, started, strict=True):
            if isinstance(server, Server):
                servers[system] = server
            elif isinstance(server, Exception):
                result.systems[system].error = f"cannot start: {server}"
                print(f"   {system:<12} cannot start: {server}", file=sys.stderr, flush=True)
            else:
                fatal = server
        if fatal is not None:
            raise fatal  # the servers that did start are stopped below
        if sc.warmup is not None:
            for system, server in servers.items():
                await _measure(sc, system, server, sc.warmup, result.systems[system], "warm-up")
        if options.profile_dir is not None and OURS in servers:
            profiler = Profiler(servers[OURS].pid, options.profile_dir / f"{sc.name}-{sc.store}.svg")
        for i in range(options.repeat):
            for system, server in servers.items():
                runs = result.systems[system]
                if runs.error is None:
                    await _measure(sc, system, server, sc.params, runs, f"run {i + 1}/{options.repeat}")
    finally:
        if profiler is not None:
            profiler.stop()
        for server in servers.values():
            server.stop()


async def _run_fresh(sc: Scenario, options: Options, result: ScenarioResult) -> None:
    for i in range(options.repeat):
        for system in sc.systems:
            runs = result.systems[system]
            if runs.error is not None:
                continue
            try:
                server = await asyncio.to_thread(_start, system, sc.store)
            except BenchError as e:
                runs.error = str(e)
                continue
            profiler = None
            try:
                if options.profile_dir is not None and system == OURS and i == 0:
                    profiler = Profiler(server.pid, options.profile_dir / f"{sc.name}-{sc.store}.svg")
                await _measure(sc, system, server, sc.params, runs, f"run {i + 1}/{options.repeat}")
            finally:
                if profiler is not None:
                    profiler.stop()
                server.stop()


# -- the scenarios ---------------------------------------------------------------------------------

DELIVERED = Metric("delivered_per_s", "delivered msg/s")
PUBLISHED = Metric("published_per_s", "published msg/s")
P50 = Metric("p50_ms", "p50 ms", higher_is_better=False, digits=2)
P99 = Metric("p99_ms", "p99 ms", higher_is_better=False, digits=2)
P999 = Metric("p999_ms", "p99.9 ms", higher_is_better=False, digits=2)


def _throughput_driver(server: Server, p: _load.ThroughputParams) -> Awaitable[dict[str, float]]:
    return _load.throughput(server.target, p)


def _latency_driver(server: Server, p: _load.LatencyParams) -> Awaitable[dict[str, float]]:
    return _load.latency(server.target, p)


def _fanout_driver(server: Server, p: _load.FanoutParams) -> Awaitable[dict[str, float]]:
    return _hosts.fanout(server.target, p, server.cpu_seconds)


def _streams_driver(server: Server, p: _load.StreamsParams) -> Awaitable[dict[str, float]]:
    return _hosts.streams(server.target, server.rss_bytes, p)


def _seed_driver(server: Server, p: _load.SeedParams) -> Awaitable[dict[str, float]]:
    return _load.seed(server.target, p)


def throughput(p: _load.ThroughputParams, store: str) -> Scenario:
    title = (
        f"{p.producers} producers -> {p.consumers} consumers, {p.mode}, {p.payload} B payloads, "
        f"{p.batch} per PublishRequest, max_in_flight {p.max_in_flight}, {p.messages:,} messages"
    )
    warm = dataclasses.replace(p, messages=min(p.messages, max(p.batch * p.producers, p.messages // 10)))
    return Scenario(
        name="throughput",
        title=title,
        params=p,
        warmup=warm,
        systems=(OURS, RAW, MINIMAL),
        metrics=(DELIVERED, PUBLISHED),
        ratio_metrics=("delivered_per_s",),
        driver=_throughput_driver,
        store=store,
        about=(
            "delivered msg/s: messages delivered to the consumers per second, from the first publish "
            "until every message was delivered and every publish answered (consumers ack each batch)",
        ),
    )


def latency(p: _load.LatencyParams, store: str) -> Scenario:
    title = (
        f"unary Publish at {p.rate:,.0f} msg/s -> 1 consumer, {p.payload} B payloads, {p.messages:,} messages"
    )
    return Scenario(
        name="latency",
        title=title,
        params=p,
        warmup=dataclasses.replace(p, messages=min(p.messages, 1000)),
        systems=(OURS, MINIMAL),
        metrics=(P50, P99, P999, Metric("max_ms", "max ms", higher_is_better=False, digits=2)),
        ratio_metrics=("p50_ms", "p99_ms", "p999_ms"),
        driver=_latency_driver,
        store=store,
        about=(
            "latency: from the start of the Publish call to the delivery read, on one clock (one process)",
        ),
    )


def fanout(p: _load.FanoutParams, store: str) -> Scenario:
    title = (
        f"1 -> {p.subscribers:,} broadcast subscribers ({p.per_connection} per connection, "
        f"{'acking each delivery' if p.ack else 'auto_ack'}), "
        f"one {p.payload} B message per round, {p.rounds} rounds"
    )
    return Scenario(
        name="fanout",
        title=title,
        params=p,
        warmup=dataclasses.replace(p, subscribers=min(p.subscribers, 100), rounds=3),
        systems=(OURS, RAW, MINIMAL),
        metrics=(
            Metric("one_to_all_ms", "one to all ms (median round)", higher_is_better=False, digits=1),
            Metric("one_to_all_max_ms", "one to all ms (worst round)", higher_is_better=False, digits=1),
            Metric("deliveries_per_s", "deliveries/s"),
            Metric("server_cpu_ms", "server CPU ms per round", higher_is_better=False, digits=1),
            Metric("load_cpu_ms", "load CPU ms per round", higher_is_better=False, digits=1),
            Metric("open_s", "open all s", higher_is_better=False, digits=2),
        ),
        ratio_metrics=("one_to_all_ms",),
        driver=_fanout_driver,
        store=store,
        about=(
            "one to all: from the Publish call to the last subscriber's read, measured in the one load "
            "process, whose Python reads every subscriber's stream: raw gRPC (nothing behind it) shows "
            "that share; the broker's own share is its excess over raw gRPC",
            "server / load CPU ms per round: CPU time the server process and the load process used "
            "over the rounds, per round: the two run side by side, so a round takes at "
            "least the larger of the two",
        ),
    )


def _streams_notes(systems: dict[str, SystemRuns]) -> list[str]:
    notes = []
    for name, runs in systems.items():
        codes: dict[str, float] = {}
        for run in runs.runs:
            for key, value in run.items():
                if key.startswith("first_try_") and key != "first_try_failures":
                    codes[key.removeprefix("first_try_").upper()] = codes.get(key, 0.0) + value
        if codes:
            detail = ", ".join(f"{int(v):,} {k}" for k, v in sorted(codes.items()))
            notes.append(f"{SYSTEM_LABELS.get(name, name)}: first opens that failed, over all runs: {detail}")
    return notes


def streams(p: _load.StreamsParams, store: str) -> Scenario:
    if p.client == "sdk" and p.per_connection > 1:
        who = (
            f"by one SDK client, a gateway's ({p.per_connection} streams per connection, "
            "AsyncClient.subscribe, retrying by itself)"
        )
    elif p.client == "sdk":
        who = "by SDK clients (AsyncClient.subscribe, retrying by themselves)"
    else:
        who = f"over raw stubs ({p.per_connection} per connection)"
    title = (
        f"{p.streams:,} idle host streams, each on its own channel, opened at once {who}, "
        f"then one {p.payload} B message to each"
    )
    return Scenario(
        name="streams",
        title=title,
        params=p,
        warmup=None,
        systems=(OURS,) if p.client == "sdk" else (OURS, RAW, MINIMAL),
        metrics=(
            Metric("rss_per_stream_kb", "RSS per stream KB", higher_is_better=False, digits=1),
            Metric("open_s", "open all s", higher_is_better=False, digits=2),
            Metric("first_try_failures", "failed first opens", higher_is_better=False),
            Metric("opened", "opened"),
            Metric("push_all_ms", "push to all ms", higher_is_better=False),
            Metric("served", "served"),
        ),
        ratio_metrics=("rss_per_stream_kb", "open_s", "push_all_ms"),
        driver=_streams_driver,
        store=store,
        fresh_server=True,
        notes=_streams_notes,
        about=(
            "RSS per stream: the server's RSS growth over a fresh process, divided by the streams; "
            "with one connection per stream it includes each connection's memory in gRPC core",
            "failed first opens: opens that ended before Opened (the storm); they are retried with "
            "jittered backoff, as the SDK does, until every stream is open",
        ),
    )


def seed(p: _load.SeedParams, store: str) -> Scenario:
    title = (
        f"seed protocol: {p.producers} SubmitMessage calls in flight -> 1 PushMessageStream, "
        f"{p.payload} B, {p.messages:,} messages"
    )
    return Scenario(
        name="seed",
        title=title,
        params=p,
        warmup=dataclasses.replace(p, messages=min(p.messages, 1000)),
        systems=(OURS, RAW, MINIMAL),
        metrics=(DELIVERED, Metric("submitted_per_s", "submitted msg/s")),
        ratio_metrics=("delivered_per_s",),
        driver=_seed_driver,
        store=store,
    )
